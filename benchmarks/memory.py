"""A model whose training state is three times the host budget, trained inside that budget.

    bash scripts/venv-run python benchmarks/memory.py [--preset llama-1.1b] [--steps 2] [--share 3]
                                                      [--nvme-dir DIR] [--record DIR]

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

Before anything runs it checks the free space where the store and the export go (the disk is the other
ceiling: 12 bytes a parameter on NVMe for the weights and moments, 4 for the exported weights) and stops
with what is missing. ``--record DIR`` keeps the evidence of the big job there: the plan (``plan.txt``, as
``tiertune plan`` prints it), the job's log, ``summary.json``, ``metrics.jsonl`` (each step's time, tiers,
NVMe bytes), the Chrome trace ``trace.json`` and ``memory.png`` (bytes per tier over time), and this
script's own report (``report.txt``). The largest full fine-tune on the development machine
(``--preset llama-3b --share 2.33``) is recorded in ``benchmarks/results/largest/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

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


def train(out: Path, overrides: list[str], log: Path | None = None) -> dict:
    """Run the job, passing its progress lines on as they come (a big model's step takes minutes)."""
    cmd = [sys.executable, "-m", "tiertune", "train", f"output_dir={out}", *JOB, *overrides]
    lines: list[str] = []
    with subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("tiertune") or line.lstrip().startswith("step"):
                print("   ", line.rstrip(), flush=True)
    if log is not None:
        log.write_text("".join(lines))
    if proc.returncode != 0:
        print("".join(lines)[-3000:])
        raise SystemExit(f"the job failed with exit status {proc.returncode}")
    return json.loads((out / "summary.json").read_text())


def plan(overrides: list[str]) -> str:
    cmd = [sys.executable, "-m", "tiertune", "plan", *JOB, *overrides]
    proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(proc.stdout)
        raise SystemExit(f"the job cannot be planned (exit status {proc.returncode}): see above")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1.1b")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--share", type=float, default=3.0, help="training state / host budget")
    parser.add_argument("--nvme-dir", default=None)
    parser.add_argument("--record", default=None, help="keep the big job's plan, trace and figures here")
    args = parser.parse_args()
    numel = sum(
        p.numel() for p in build_model(ModelConfig(preset=args.preset), seed=0, device="meta").parameters()
    )
    state = 16 * numel  # fp32 weights, gradients, exp_avg, exp_avg_sq
    budget_gib = state / args.share / 2**30
    store = [f"offload.nvme_dir=[{args.nvme_dir}]"] if args.nvme_dir else []
    if args.nvme_dir:
        Path(args.nvme_dir).mkdir(parents=True, exist_ok=True)  # the job wants it made
    record = Path(args.record) if args.record else None
    ram = psutil.virtual_memory().total
    print(f"{args.preset}: {numel / 1e9:.2f}B parameters, fp32 training state {format_bytes(state)}")
    print(f"  this machine's RAM {format_bytes(ram)}: the state is {state / ram:.2f}x of it")
    # the store and the export, summed by filesystem (they may share one)
    disk_need: dict[int, list] = {}
    for where, need in ((Path(args.nvme_dir or "."), 12 * numel), (Path("."), 4 * numel)):
        disk_need.setdefault(where.stat().st_dev, [where, 0])[1] += need
    for where, need in disk_need.values():
        free = shutil.disk_usage(where).free
        print(
            f"  disk: {format_bytes(need)} needed on the drive of {where.resolve()}, {format_bytes(free)} free"
        )
        if free < need * 1.05:
            raise SystemExit(
                f"not enough disk space on the drive of {where.resolve()}: free {format_bytes(need * 1.05 - free)} "
                "more, or pass --nvme-dir on a drive with room"
            )
    print(f"  host budget {budget_gib:.2f} GiB (state / {args.share:g}); {args.steps} steps of 1 x 64 tokens")
    big_job = [
        f"model.preset={args.preset}",
        f"memory.host_budget_gib={budget_gib:.3f}",
        f"train.max_steps={args.steps}",
        *store,
    ]
    if record is not None:
        big_job.append("train.trace=true")
        record.mkdir(parents=True, exist_ok=True)
        planned = plan(big_job)
        (record / "plan.txt").write_text(planned)
        print("  " + "\n  ".join(planned.rstrip().splitlines()))
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        big = train(Path(tmp) / "big", big_job, log=record / "job.log" if record else None)
        if record is not None:
            for name in ("summary.json", "metrics.jsonl", "trace.json", "memory.png", "config.resolved.yaml"):
                if (Path(tmp) / "big" / name).exists():
                    shutil.copy(Path(tmp) / "big" / name, record / name)
        tiny = train(Path(tmp) / "tiny", ["model.preset=tiny-llama", f"train.max_steps={args.steps}"])
    budget = budget_gib * 2**30
    report: list[str] = []
    rss, base = big["peak_rss_bytes"], tiny["peak_rss_bytes"]
    rows = (
        [json.loads(line) for line in (record / "metrics.jsonl").read_text().splitlines()] if record else []
    )
    report.append(
        f"  tiers at their peak: {', '.join(f'{t} {format_bytes(n)}' for t, n in big['memory']['peak_bytes'].items())}"
    )
    for row in rows:
        moved = ", ".join(
            f"{way} {kind} {format_bytes(n)}"
            for way, kinds in sorted(row.get("nvme_bytes", {}).items())
            for kind, n in sorted(kinds.items())
        )
        report.append(
            f"  step {row['step']}: {row['step_time_s']:.1f} s, loss {row['loss']:.4f}; NVMe {moved}"
        )
    report.append(f"  peak RSS, {args.preset} job        {format_bytes(rss)}")
    report.append(f"  peak RSS, tiny-llama job (the process's fixed cost)  {format_bytes(base)}")
    report.append(f"  ratio state / peak RSS            {state / rss:.2f}")
    report.append(f"  ratio peak RSS / budget           {rss / budget:.3f}")
    report.append(f"  ratio (peak RSS - fixed cost) / budget  {(rss - base) / budget:.3f}")
    limit = budget + OVERHEAD_GIB * 2**30
    verdict = "within" if rss <= limit else "OVER"
    report.append(
        f"  peak RSS {verdict} budget + {OVERHEAD_GIB:g} GiB stated overhead ({format_bytes(limit)})"
    )
    report.append(f"  losses: first {big['first_loss']:.4f}, last {big['final_loss']:.4f}")
    print("\n".join(report))
    if record is not None:
        (record / "report.txt").write_text("\n".join(report) + "\n")
    raise SystemExit(0 if rss <= limit else 1)


if __name__ == "__main__":
    main()
