"""Optimizer state on NVMe against the same training step with everything in RAM, side by side in one run.

    bash scripts/venv-run python benchmarks/overlap.py [--preset small-llama] [--steps 8] [--repeats 2]

Three placements of one seeded job train in turn (ram, block, nvme, ram, block, nvme, ...), so machine
noise hits all of them:

- ram: everything resident, torch's fused AdamW (the engine tiertune picks when everything fits);
- block: the block engine with the optimizer state in RAM (the same update code as nvme, no I/O);
- nvme: the block engine with the optimizer state on an NVMe store, streamed through the update in
  chunks (read j+1 | update j | write j-1).

It prints the median step time of each and the ratios nvme/ram and nvme/block (goal: nvme/ram at most
1.25 once the batch makes compute longer than the state's I/O), and the NVMe bytes moved per step.
The first two steps of each run are warm-up and not counted. Pass --nvme-dir to put the store on a
particular drive (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _timing import TIMED_JOB  # benchmarks/, the script's own directory

from tiertune.config import load_config
from tiertune.launch.loop import run
from tiertune.launch.progress import quiet_libraries

PLACEMENTS = {
    "ram": [],
    "block": ["offload.optimizer=host"],
    "nvme": ["offload.optimizer=nvme"],
}


def step_times(overrides: list[str], steps: int, out: Path) -> tuple[list[float], dict]:
    cfg = load_config(None, [*TIMED_JOB, *overrides, f"train.max_steps={steps}", f"output_dir={out}"])
    stamps: list[float] = []
    summary = run(cfg, callbacks=[lambda row: stamps.append(time.perf_counter())])
    return [b - a for a, b in zip(stamps[1:], stamps[2:])], summary.memory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small-llama")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--nvme-dir", default=None)
    args = parser.parse_args()
    quiet_libraries()
    shape = [
        f"model.preset={args.preset}",
        f"train.micro_batch_size={args.micro_batch}",
        f"data.seq_len={args.seq_len}",
    ]
    times: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    nvme_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, extra in PLACEMENTS.items():
                store = [f"offload.nvme_dir=[{args.nvme_dir}]"] if args.nvme_dir and name == "nvme" else []
                t, memory = step_times([*shape, *extra, *store], args.steps, Path(tmp) / f"{name}-{r}")
                times[name] += t
                if name == "nvme":
                    nvme_bytes = memory["bytes"].get("nvme", {}).get("optimizer", 0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.preset}, micro-batch {args.micro_batch} x {args.seq_len}, {len(times['ram'])} steps each")
    for name, m in med.items():
        print(f"  {name:6} median step {m * 1e3:8.1f} ms")
    print(f"  NVMe optimizer state: {nvme_bytes / 2**20:.1f} MiB read and written per step")
    print(f"  ratio nvme/ram   {med['nvme'] / med['ram']:.3f}  (goal <= 1.25)")
    print(f"  ratio nvme/block {med['nvme'] / med['block']:.3f}  (the I/O alone)")
    print(f"  ratio block/ram  {med['block'] / med['ram']:.3f}  (the block engine alone)")


if __name__ == "__main__":
    main()
