"""The tuning methods on a language model against vanilla peft LoRA: step time, eval loss, peak RSS, and
the bytes of the frozen base the offload engine reads per step, side by side in one run.

    bash scripts/venv-run python benchmarks/tuning_lm.py [--preset small-llama] [--pretrain-steps 150]
                                                         [--steps 60] [--bits 4 3] [--out DIR]

Compressing or truncating a random base says little, so the script first trains the base: full tuning of
the preset on builtin:arithmetic for --pretrain-steps in bf16, exported as an HF model directory. Then,
on that base, with the same data, seed, batch (8 x 128 tokens), steps, lr and LoRA rank (16), bf16, each
in its own process:

- peft: vanilla peft LoRA, a plain PyTorch loop (HF model + peft + torch.optim.AdamW, fused), resident;
- lora: tiertune's LoRA with every weight homed on NVMe (offload.params=nvme);
- luc_lora Nb: LoRA over the base compressed to N average bits (tuning.luc.avg_bits), weights on NVMe;
- depth: adaptive depth (exits after each quarter of the layers, cloned heads, the fitted
  vote), weights on NVMe; "depth, 2 windows": one exit, after half the layers;
- s2a (side): the side network, activations in 4 bits, weights on NVMe.

Per variant: the median step time (the first two steps warm up), the final eval loss (the vote's, for
depth) on the same eval batches, peak RSS, the activations one micro-batch keeps for backward (saved-tensor
hooks, each storage once, weights not counted; depth: its first window),
and for the tiertune variants the frozen base's bytes read from NVMe per step (the metrics' nvme_bytes),
with ratios to vanilla peft (bytes read: to lora). Goals: LUC at
4 bits reads at most 0.3x the base's bytes with eval loss within 5%; depth at most 0.5x LoRA's step time
at comparable loss.
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
    "data.path=builtin:arithmetic",
    "data.seq_len=128",
    "train.micro_batch_size=8",
    "train.dtype=bf16",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.eval_max_batches=8",
    "train.progress=off",
    "train.eval_exact_match_samples=0",
]
TUNE = ["optim.lr=2e-3", "tuning.lora.r=16", "tuning.lora.alpha=32"]


def train(out: Path, *overrides: str) -> dict:
    tiertune("train", f"output_dir={out}", *overrides)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    timed = rows[2:] or rows
    return {
        "read": statistics.median(
            r.get("nvme_bytes", {}).get("read", {}).get("frozen params", 0) for r in timed
        ),
        "step_s": statistics.median(r["step_time_s"] for r in timed),
        "eval_loss": summary["eval_loss"],
        "peak_rss": summary["peak_rss_bytes"],
        "peak_device": summary.get("peak_device_bytes"),
        "exits": rows[-1].get("exits"),
    }


def saved_activation_bytes(base: Path, overrides: list[str]) -> int:
    """Bytes of the activations one training micro-batch keeps for backward, counted with saved-tensor
    hooks: each storage once, the weights not counted. The model is built as the job builds it (its base
    resident here: where the weights live does not change what the graph keeps)."""
    import torch

    from tiertune.config import load_config
    from tiertune.launch.data import BatchStream, build_splits
    from tiertune.launch.models import (
        WEIGHT_DTYPES,
        cast_parameters,
        load_tokenizer,
        materialize,
        skeleton,
        weight_source,
    )
    from tiertune.tuning import get_method
    from tiertune.tuning.depth import controller_of

    plain = "tuning.method=peft" in overrides
    cfg = load_config(
        None, [f"model.path={base}", *COMMON, *TUNE, *[o for o in overrides if "peft" not in o]]
    )
    torch.manual_seed(cfg.train.seed)
    if plain:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, local_files_only=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        model = get_method(cfg.tuning.method).apply(skeleton(cfg.model), cfg.tuning)
        materialize(model, weight_source(cfg.model, cfg.train.seed, model))
        cast_parameters(model, WEIGHT_DTYPES[cfg.train.dtype])
        if controller_of(model) is not None:
            controller_of(model).begin_step(1)  # the first window (windows of equal size keep about as much)
    batch = BatchStream(build_splits(cfg.data, load_tokenizer(cfg.model), 0).train, 8, 0).next_batch()
    return saved_bytes(
        model, lambda: model(input_ids=batch["input_ids"]).logits.float().logsumexp(-1).mean().backward()
    )


def plain_peft(out: Path, base: Path, steps: int) -> None:
    """Vanilla peft LoRA: HF model + peft + fused AdamW, the job's data, schedule and eval batches."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tiertune.config import load_config
    from tiertune.launch.data import BatchStream, build_splits, eval_batches
    from tiertune.launch.models import load_tokenizer

    cfg = load_config(None, [f"model.path={base}", *COMMON, *TUNE, f"train.max_steps={steps}"])
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, local_files_only=True)
    lora = cfg.tuning.lora
    model = get_peft_model(
        model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    ).to(device())
    splits = build_splits(cfg.data, load_tokenizer(cfg.model), cfg.train.seed)
    stream = BatchStream(splits.train, cfg.train.micro_batch_size, cfg.train.seed)

    def loss_sum(batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")

    def loss_mean(batch: dict) -> torch.Tensor:
        return loss_sum(batch) / int((batch["labels"][:, 1:] != -100).sum())

    times = train_plain(model, stream, cfg.optim, steps, loss_mean)
    model.eval()
    with torch.no_grad():
        batches = eval_batches(splits.eval, cfg.train.micro_batch_size, cfg.train.eval_max_batches)
        total = sum(float(loss_sum(on_device(b))) for b in batches)
        targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    result = {
        "read": 0,
        "step_s": statistics.median(times[2:]),
        "eval_loss": total / targets,
        "peak_rss": peak_rss(),
        "peak_device": peak_device(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-llama")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0])
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--plain-peft", nargs=2, metavar=("OUT", "BASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_peft:  # the vanilla baseline, in a process of its own
        plain_peft(Path(args.plain_peft[0]), Path(args.plain_peft[1]), args.steps)
        return
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tiertune-tuning-"))
    print(f"pretraining {args.preset} for {args.pretrain_steps} steps (full tuning, bf16)", flush=True)
    tiertune("train", f"output_dir={root / 'base'}", f"model.preset={args.preset}", *COMMON,
             f"train.max_steps={args.pretrain_steps}")  # fmt: skip
    base = root / "base" / "final"
    results = {}
    print("tuning: peft (vanilla)", flush=True)
    cmd = [
        sys.executable,
        __file__,
        "--steps",
        str(args.steps),
        "--plain-peft",
        str(root / "peft"),
        str(base),
    ]
    subprocess.run(cmd, check=True, cwd=REPO)
    results["peft (vanilla)"] = json.loads((root / "peft" / "result.json").read_text())
    tune = [f"model.path={base}", *COMMON, *TUNE, f"train.max_steps={args.steps}", "offload.params=nvme"]
    variants = {"lora": ["tuning.method=lora"]}
    for bits in args.bits:
        variants[f"luc_lora {bits:g}b"] = ["tuning.method=luc_lora", f"tuning.luc.avg_bits={bits}"]
    variants["depth"] = ["tuning.method=depth"]
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    variants["depth, 2 windows"] = ["tuning.method=depth", f"tuning.depth.exits=[{layers // 2}]"]
    variants["s2a (side)"] = ["tuning.method=s2a"]
    for name, overrides in variants.items():
        print(f"tuning: {name}", flush=True)
        results[name] = train(root / name.replace(" ", "-"), *tune, *overrides)
    print("measuring saved activations", flush=True)
    for name, overrides in {"peft (vanilla)": ["tuning.method=peft"], **variants}.items():
        results[name]["saved"] = saved_activation_bytes(base, overrides)
    ref, lora = results["peft (vanilla)"], results["lora"]
    print(
        f"\n{args.preset}, pretrained {args.pretrain_steps} steps; LoRA r=16, {args.steps} steps of 8 x 128 "
        "tokens, bf16; tiertune's weights on NVMe"
    )
    print(
        "| variant | step (s) | x peft | eval loss | x peft | peak RSS | x peft | saved activations | x peft "
        "| base read / step | x lora |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        read = f"{r['read'] / 2**20:.2f} MiB | {r['read'] / lora['read']:.3f}" if r["read"] else "- | -"
        print(
            f"| {name} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f} | {r['eval_loss']:.4f} | "
            f"{r['eval_loss'] / ref['eval_loss']:.3f} | {r['peak_rss'] / 2**20:.0f} MiB | "
            f"{r['peak_rss'] / ref['peak_rss']:.2f} | {r['saved'] / 2**20:.1f} MiB | "
            f"{r['saved'] / ref['saved']:.2f} | {read} |"
        )
    print_device_peaks(results)
    for name in ("depth", "depth, 2 windows"):
        exits = results[name].get("exits") or {}
        print(f"{name}, eval loss by exit: " + ", ".join(f"{n} {m['loss']:.4f}" for n, m in exits.items()))
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nruns and results in {root}")


if __name__ == "__main__":
    main()
