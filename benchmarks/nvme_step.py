"""The optimizer step over NVMe-resident state against what the disk and the CPU kernel allow, in one run.

    bash scripts/venv-run python benchmarks/nvme_step.py [--preset qwen2-0.5b] [--steps 4] [--repeats 2]
                                                        [--nvme-dir DIR]

With ``optim.overlap=none`` every block's update runs inside the optimizer step, after backward: the step
is the pipeline alone (read chunk j+1 | update chunk j | write chunk j-1 through the staging slots). Three
runs of one seeded job, in turn, so machine noise hits all of them; each times its optimizer steps only:

- pipelined: the optimizer state on NVMe, the real kernel;
- disk only: the same pipeline with a kernel that does nothing (the time the drive needs for the state);
- kernel only: the state in host memory (the time the CPU kernel needs).

It prints the median step of each and the pipeline's efficiency, max(disk only, kernel only) / pipelined
(goal: at least 0.85), the bytes moved per step and the effective disk bandwidth, and the host memory the
pipeline holds for state in flight (its staging slots) against the state's size. The first step of each
run is warm-up and not counted. It also measures the drive as ``tiertune probe`` does (O_DIRECT, queue
depth 8, 1 MiB blocks, reads and writes apart) and prints the time those rates allow for the step's bytes
(read / read rate + written / write rate) against the kernel's: the same efficiency with the raw drive
as the disk's bound.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from _timing import TIMED_JOB, without_arithmetic  # benchmarks/, the script's own directory

from tiertune.config import load_config
from tiertune.launch.loop import run
from tiertune.launch.probe import nvme_gbps
from tiertune.launch.progress import quiet_libraries
from tiertune.optim import blockwise

RUNS = {
    "pipelined": ["offload.optimizer=nvme"],
    "disk only": ["offload.optimizer=nvme"],
    "kernel only": ["offload.optimizer=host"],
}


def optimizer_steps(overrides: list[str], out: Path, no_kernel: bool) -> tuple[list[float], dict]:
    """Seconds of each optimizer step of one run, and what the updater held."""
    times: list[float] = []
    held: dict = {}
    step = blockwise.BlockAdamW.step

    def timed(self, lr):
        t0 = time.perf_counter()
        report = step(self, lr)
        self.flush()  # the last writes land and the next step's read-ahead is dropped: all its I/O is inside
        times.append(time.perf_counter() - t0)
        held.update(
            state=sum(8 * s.flat.numel for s in self.states),
            staging=self.staging.reserved_bytes if self.staging is not None else 0,
        )
        return report

    blockwise.BlockAdamW.step = timed
    try:
        with without_arithmetic() if no_kernel else contextlib.nullcontext():
            run(load_config(None, [*TIMED_JOB, *overrides, f"output_dir={out}"]))
    finally:
        blockwise.BlockAdamW.step = step
    return times[1:], held


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen2-0.5b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nvme-dir", default=None)
    args = parser.parse_args()
    quiet_libraries()

    job = [
        f"model.preset={args.preset}",
        "data.seq_len=64",
        "train.micro_batch_size=1",
        f"train.max_steps={args.steps}",
        "optim.overlap=none",
    ]
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    held: dict = {}
    with tempfile.TemporaryDirectory(prefix="tiertune-nvme-step-") as tmp:
        nvme = [f"offload.nvme_dir=[{args.nvme_dir}]"] if args.nvme_dir else []
        for r in range(args.repeats):
            for name, placement in RUNS.items():
                print(f"round {r + 1}/{args.repeats}: {name}", flush=True)
                out = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                steps, h = optimizer_steps([*job, *placement, *nvme], out, no_kernel=name == "disk only")
                times[name] += steps
                held = held or h
        print("the drive alone, as tiertune probe measures it", flush=True)
        drive = nvme_gbps(Path(args.nvme_dir or tmp), 1 << 30, [8], [1 << 20], 3)
    med = {name: statistics.median(t) for name, t in times.items()}
    moved = 2 * held["state"]  # every chunk read and written once a step
    print(
        f"{args.preset}: optimizer state {held['state'] / 2**30:.2f} GiB, {len(times['pipelined'])} steps timed each"
    )
    for name in RUNS:
        print(f"  {name:<12} median optimizer step {med[name]:8.3f} s")
    bound = max(med["disk only"], med["kernel only"])
    print(
        f"  bytes read + written per step: {moved / 2**30:.2f} GiB; pipelined {moved / med['pipelined'] / 1e9:.2f} GB/s"
    )
    print(
        f"  pipeline efficiency max(disk only, kernel only) / pipelined: {bound / med['pipelined']:.3f} (goal >= 0.85)"
    )
    raw = held["state"] / (drive["read_qd8_bs1024k"] * 1e9) + held["state"] / (
        drive["write_qd8_bs1024k"] * 1e9
    )
    print(
        f"  the drive: read {drive['read_qd8_bs1024k']:.2f} GB/s, write {drive['write_qd8_bs1024k']:.2f} GB/s: "
        f"{raw:.3f} s for the step's bytes"
    )
    print(
        f"  efficiency max(drive, kernel only) / pipelined: {max(raw, med['kernel only']) / med['pipelined']:.3f}"
    )
    print(
        f"  host memory for state in flight: {held['staging'] / 2**20:.0f} MiB of staging slots "
        f"({held['staging'] / held['state']:.3f} of the state)"
    )


if __name__ == "__main__":
    main()
