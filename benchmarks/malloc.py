"""What ``memory.malloc_mmap_threshold_mib`` costs and saves: the same job with the allocator as it is
(0) and with freed blocks of 1 MiB and more given back (1, what ``auto`` sets for a job short of host
memory).

    bash scripts/venv-run python benchmarks/malloc.py [--preset qwen2-0.5b] [--pairs 3] [--steps 4]
                                                      [--seq-len 256] [--micro-batch 1] [--threshold 1]
                                                      [--set KEY=VALUE ...]

``--set`` adds job overrides after the benchmark's own (weights on NVMe, optimizer in memory), so they
win: ``--set tuning.method=luc_lora --set offload.optimizer=nvme``.

Each run is its own process (the setting is process-wide); the two settings alternate, so a drift of the
machine's speed hits both alike. Per run: the median step time after the first step, the resident set at
the end of the last step (what the process keeps between steps) and the peak resident set. It prints each
run, then the medians over the runs and the ratios threshold / as-is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

JOB = [
    "train.checkpoint_every=0",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.eval_exact_match_samples=0",
    "train.progress=off",
    "train.tensorboard=off",
    "offload.params=nvme",
    "offload.optimizer=host",
    "offload.prefetch_depth=1",
]


def one_run(out: Path, args: argparse.Namespace, threshold: float) -> dict[str, float]:
    cmd = [
        sys.executable,
        "-m",
        "tiertune",
        "train",
        f"output_dir={out}",
        f"model.preset={args.preset}",
        f"data.seq_len={args.seq_len}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"memory.malloc_mmap_threshold_mib={threshold:g}",
        *JOB,
        *args.set,
    ]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr[-3000:])
        raise SystemExit(f"the job failed with exit status {done.returncode}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": statistics.median(r["step_time_s"] for r in rows[1:]),
        "rss_gib": rows[-1]["rss_bytes"] / 2**30,
        "peak_gib": max(r["peak_rss_bytes"] for r in rows) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen2-0.5b")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=1.0, help="MiB, against 0 (as it is)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a job override")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2: the first step is the warm-up")
    print(
        f"{args.preset}, {args.micro_batch} x {args.seq_len} tokens, weights on NVMe, optimizer in memory"
        f"{''.join(f', {o}' for o in args.set)}; {args.steps} steps a run, {args.pairs} pairs: "
        f"memory.malloc_mmap_threshold_mib={args.threshold:g} vs 0 (as it is)"
    )
    runs: dict[float, list[dict[str, float]]] = {args.threshold: [], 0.0: []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.pairs):
            for threshold in runs:
                r = one_run(Path(tmp) / f"{threshold:g}-{k}", args, threshold)
                runs[threshold].append(r)
                print(
                    f"  threshold {threshold:g} MiB: step {r['step_s']:.2f} s, RSS between steps "
                    f"{r['rss_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB",
                    flush=True,
                )
    med = {t: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for t, rs in runs.items()}
    on, off = med[args.threshold], med[0.0]
    print("medians             as is   threshold   ratio")
    for key, label in (
        ("step_s", "step time s"),
        ("rss_gib", "RSS between steps GiB"),
        ("peak_gib", "peak RSS GiB"),
    ):
        print(f"  {label:22} {off[key]:7.2f} {on[key]:9.2f} {on[key] / off[key]:9.3f}")


if __name__ == "__main__":
    main()
