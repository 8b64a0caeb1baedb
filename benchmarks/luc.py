"""LoRA over a LUC-compressed base against LoRA over the 16-bit base: the bytes the offload engine reads
per step, eval loss and step time, side by side in one run.

    bash scripts/venv-run python benchmarks/luc.py [--preset tiny-llama] [--pretrain-steps 300]
                                                   [--steps 150] [--bits 4 3] [--out DIR]

Compressing a random base says little (random weights quantize unlike trained ones), so the script first
trains the base: full tuning of the preset on builtin:arithmetic for --pretrain-steps in bf16, exported as
an HF model directory. It then tunes that base with LoRA and with luc_lora at each of --bits average bits,
the same data, seed, batch and steps, every weight homed on NVMe (offload.params=nvme) in bf16, each in its
own process. Per variant it prints the frozen base's bytes read from NVMe per step (the metrics'
nvme_bytes; the median over the run), the weights stored on NVMe (base and adapters), the median step
time and the final eval loss, and their ratios to LoRA. Goal at 4 bits: at most 0.3x LoRA's base bytes moved, eval loss
within 5% of LoRA's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiertune(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tiertune", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tiertune {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def train(out: Path, *overrides: str) -> dict:
    tiertune(
        "train", f"output_dir={out}", "train.progress=off", "train.eval_exact_match_samples=0", *overrides
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    timed = rows[2:] or rows  # the first steps warm up
    policy = out / "luc_policy.json"
    return {
        "read": statistics.median(
            r.get("nvme_bytes", {}).get("read", {}).get("frozen params", 0) for r in timed
        ),
        "stored": summary["memory"]["bytes"]["nvme"]["params"],
        "step_s": statistics.median(r["step_time_s"] for r in timed),
        "eval_loss": summary["eval_loss"],
        "policy": json.loads(policy.read_text()) if policy.is_file() else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-llama")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0])
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tiertune-luc-"))
    common = [
        "data.path=builtin:arithmetic",
        "data.seq_len=128",
        "train.micro_batch_size=8",
        "train.dtype=bf16",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.eval_max_batches=0",
    ]
    print(f"pretraining {args.preset} for {args.pretrain_steps} steps (full tuning, bf16)", flush=True)
    tiertune(
        "train", f"output_dir={root / 'base'}", f"model.preset={args.preset}", *common,
        f"train.max_steps={args.pretrain_steps}", "train.progress=off", "train.eval_exact_match_samples=0",
    )  # fmt: skip
    tune = [
        f"model.path={root / 'base' / 'final'}",
        *common,
        f"train.max_steps={args.steps}",
        "offload.params=nvme",
        "optim.lr=2e-3",
        "tuning.lora.r=16",
    ]
    variants = {"lora": ["tuning.method=lora"]}
    for bits in args.bits:
        variants[f"luc_lora {bits:g}b"] = ["tuning.method=luc_lora", f"tuning.luc.avg_bits={bits}"]
    results = {}
    for name, overrides in variants.items():
        print(f"tuning: {name}", flush=True)
        results[name] = train(root / name.replace(" ", "-"), *tune, *overrides)
    base = results["lora"]
    print(
        f"\n{args.preset}, pretrained {args.pretrain_steps} steps; LoRA r=16 for {args.steps} steps, bf16, weights on NVMe"
    )
    print(
        "| variant | base read / step | x LoRA | weights on NVMe | x LoRA | step (s) | x LoRA | eval loss | x LoRA | policy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        policy = r["policy"]
        bits = " ".join(str(s["bits"]) for s in policy["layers"].values()) if policy else "16-bit base"
        print(
            f"| {name} | {r['read'] / 2**20:.2f} MiB | {r['read'] / base['read']:.3f} | "
            f"{r['stored'] / 2**20:.2f} MiB | {r['stored'] / base['stored']:.3f} | {r['step_s']:.3f} | "
            f"{r['step_s'] / base['step_s']:.2f} | {r['eval_loss']:.4f} | {r['eval_loss'] / base['eval_loss']:.3f} | "
            f"{bits} |"
        )
    (root / "luc-results.json").write_text(json.dumps(results, indent=1))
    print(f"\nruns and results in {root}")


if __name__ == "__main__":
    main()
