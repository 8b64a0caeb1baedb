"""A model whose training state is three times the host budget, trained inside that budget.

    bash scripts/venv-run python benchmarks/memory.py [--preset llama-1.1b] [--steps 2] [--share 3]

The preset (TinyLlama-1.1B-shaped, 1.1B parameters, full fine-tuning in fp32: weights, gradients and two
Adam moments, 16 bytes a parameter) is trained with ``memory.host_budget_gib`` set to 1/``share`` of that
state. The planner puts what does not fit on an NVMe store; the model is built block by block straight
into its tiers and never exists whole. Two jobs run side by side, each in its own process:

- the big job, whose peak RSS is what the budget is about;
- the same job on ``tiny-llama`` (a few MB of state), whose peak RSS is the fixed cost of the process
  (interpreter, torch, transformers, the data): the overhead the budget does not cover.

It prints the state, the budget, both peak RSS figures, and the ratios. The claim it checks: peak RSS of
the big job <= budget + OVERHEAD_GIB (a stated fixed overhead, see below); it exits 1 if not.
Pass --nvme-dir to put the store on a particular drive (default: inside the run directory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tiertune.config import ModelConfig
from tiertune.launch.models import build_model
from tiertune.memory import format_bytes

OVERHEAD_GIB = 1.0  # the process's fixed cost (tiny-llama measures ~0.55 GiB) plus allocator slack
JOB = [
    "train.micro_batch_size=1",
    "data.seq_len=64",
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.eval_exact_match_samples=0",
    "train.progress=lines",
    "train.log_every=1",
    "offload.prefetch_depth=0",
]


def train(out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tiertune", "train", f"output_dir={out}", *JOB, *overrides]
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print("   ", "\n    ".join(line for line in proc.stdout.splitlines() if line.startswith("tiertune")))
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        raise SystemExit(f"the job failed with exit status {proc.returncode}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1.1b")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--share", type=float, default=3.0, help="training state / host budget")
    parser.add_argument("--nvme-dir", default=None)
    args = parser.parse_args()
    numel = sum(
        p.numel() for p in build_model(ModelConfig(preset=args.preset), seed=0, device="meta").parameters()
    )
    state = 16 * numel  # fp32 weights, gradients, exp_avg, exp_avg_sq
    budget_gib = state / args.share / 2**30
    store = [f"offload.nvme_dir=[{args.nvme_dir}]"] if args.nvme_dir else []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        print(f"{args.preset}: {numel / 1e9:.2f}B parameters, fp32 training state {format_bytes(state)}")
        print(
            f"  host budget {budget_gib:.2f} GiB (state / {args.share:g}); {args.steps} steps of 1 x 64 tokens"
        )
        big = train(
            Path(tmp) / "big",
            [
                f"model.preset={args.preset}",
                f"memory.host_budget_gib={budget_gib:.3f}",
                f"train.max_steps={args.steps}",
                *store,
            ],
        )
        tiny = train(Path(tmp) / "tiny", ["model.preset=tiny-llama", f"train.max_steps={args.steps}"])
    budget = budget_gib * 2**30
    rss, base = big["peak_rss_bytes"], tiny["peak_rss_bytes"]
    print(
        f"  tiers at their peak: {', '.join(f'{t} {format_bytes(n)}' for t, n in big['memory']['peak_bytes'].items())}"
    )
    print(f"  peak RSS, {args.preset} job        {format_bytes(rss)}")
    print(f"  peak RSS, tiny-llama job (the process's fixed cost)  {format_bytes(base)}")
    print(f"  ratio state / peak RSS            {state / rss:.2f}")
    print(f"  ratio peak RSS / budget           {rss / budget:.3f}")
    print(f"  ratio (peak RSS - fixed cost) / budget  {(rss - base) / budget:.3f}")
    limit = budget + OVERHEAD_GIB * 2**30
    verdict = "within" if rss <= limit else "OVER"
    print(f"  peak RSS {verdict} budget + {OVERHEAD_GIB:g} GiB stated overhead ({format_bytes(limit)})")
    print(f"  losses: first {big['first_loss']:.4f}, last {big['final_loss']:.4f}")
    raise SystemExit(0 if rss <= limit else 1)


if __name__ == "__main__":
    main()
