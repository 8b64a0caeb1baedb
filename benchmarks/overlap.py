"""Where the optimizer's work goes: the same training step with the update overlapped and not, with the
state in RAM and on NVMe, side by side in one run.

    bash scripts/venv-run python benchmarks/overlap.py [--preset small-llama] [--steps 8] [--repeats 2]
                                                      [--trace DIR]

Placements and update schedules of one seeded job train in turn (every run once, then again), so machine
noise hits all of them:

- ram: everything resident, torch's fused AdamW after backward (the engine tiertune picks when all fits);
- block / block-none: the block engine with the optimizer state in RAM, updates overlapped with backward
  (``optim.overlap=backward``, the default) / all after backward (``optim.overlap=none``);
- nvme / nvme-forward / nvme-none: the optimizer state on an NVMe store, read ahead and written back in
  chunks; updates overlapped with backward / each just before its block's next forward / all after
  backward;
- no-arithmetic: block, with a kernel that computes nothing: the step without the update's arithmetic
  (what the optimizer adds is measured against it).

Gradient clipping is off (``optim.max_grad_norm=0``) in every run, so that updates made during backward
stand: a job that clips every step stops speculating after its first step and updates each block before
its next forward instead (nvme-forward). It prints how many block updates ran during backward, of all.

It prints the median step time of each and the ratios: nvme/ram (goal: at most 1.25 once the batch makes
compute longer than the state's I/O), overlapped/non-overlapped with the state in RAM and on NVMe, and
what the optimizer adds to the step without its arithmetic (goal: at most 10% where its work fits inside
backward: on an accelerator, the CPU's update; on a CPU-only machine only the NVMe traffic can hide, as the
update's arithmetic needs the same cores as backward). The first two steps of each run are warm-up and not
counted. Pass --nvme-dir to put the store on a particular drive (default: a temporary directory). --trace
DIR adds one traced nvme run (not timed) whose trace.json and memory.png stay in DIR, and prints what the
trace shows: how long the drive was busy per step, how much of that ran during forward and backward, and
how long the compute waited for state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from _timing import (
    TIMED_JOB,
    recording_updaters,
    without_arithmetic,
)  # benchmarks/, the script's own directory

from tiertune.config import load_config
from tiertune.launch.loop import run
from tiertune.launch.progress import quiet_libraries

PLACEMENTS = {
    "ram": [],
    "block": ["offload.optimizer=host", "optim.overlap=backward"],
    "block-none": ["offload.optimizer=host", "optim.overlap=none"],
    "nvme": ["offload.optimizer=nvme", "optim.overlap=backward"],
    "nvme-forward": ["offload.optimizer=nvme", "optim.overlap=forward"],
    "nvme-none": ["offload.optimizer=nvme", "optim.overlap=none"],
    "no-arithmetic": ["offload.optimizer=host", "optim.overlap=backward"],
}


def step_times(overrides: list[str], steps: int, out: Path) -> tuple[list[float], dict, tuple[int, int, int]]:
    """Step times after the first two, the run's memory summary, and (block updates made during backward,
    undone, block updates in all) as its block optimizer counted them."""
    cfg = load_config(None, [*TIMED_JOB, *overrides, f"train.max_steps={steps}", f"output_dir={out}"])
    stamps: list[float] = []
    with recording_updaters() as made:
        summary = run(cfg, callbacks=[lambda row: stamps.append(time.perf_counter())])
    counts = (0, 0, 0)
    if made:
        counts = (made[0].speculated_blocks, made[0].rollbacks, steps * len(made[0].states))
    return [b - a for a, b in zip(stamps[1:], stamps[2:])], summary.memory, counts


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
    parser.add_argument("--trace", default=None, metavar="DIR")
    args = parser.parse_args()
    quiet_libraries()
    shape = [
        f"model.preset={args.preset}",
        f"train.micro_batch_size={args.micro_batch}",
        f"data.seq_len={args.seq_len}",
        # No clipping: the updates made during backward stand. A job that clips every step speculates in
        # its first step only, then waits for the forward (what nvme-forward measures).
        "optim.max_grad_norm=0",
    ]
    times: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    spec: dict[str, list[int]] = {}
    nvme_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, extra in PLACEMENTS.items():
                nvme = args.nvme_dir and name.startswith("nvme")
                store = [f"offload.nvme_dir=[{args.nvme_dir}]"] if nvme else []
                print(f"round {r + 1}/{args.repeats}: {name}", flush=True)
                with without_arithmetic() if name == "no-arithmetic" else contextlib.nullcontext():
                    t, memory, counts = step_times(
                        [*shape, *extra, *store], args.steps, Path(tmp) / f"{name}-{r}"
                    )
                spec[name] = [a + b for a, b in zip(spec.get(name, [0, 0, 0]), counts)]
                times[name] += t
                if name == "nvme":
                    nvme_bytes = memory["bytes"].get("nvme", {}).get("optimizer", 0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.preset}, micro-batch {args.micro_batch} x {args.seq_len}, {len(times['ram'])} steps each")
    for name, m in med.items():
        print(f"  {name:13} median step {m * 1e3:8.1f} ms")
    print(f"  NVMe optimizer state: {nvme_bytes / 2**20:.1f} MiB read and written per step")
    print(f"  ratio nvme/ram                {med['nvme'] / med['ram']:.3f}  (goal <= 1.25)")
    print(f"  ratio nvme/block              {med['nvme'] / med['block']:.3f}  (the I/O alone)")
    print(f"  ratio block/ram               {med['block'] / med['ram']:.3f}  (the block engine alone)")
    print(f"  overlapped/none, RAM state    {med['block'] / med['block-none']:.3f}")
    print(f"  overlapped/none, NVMe state   {med['nvme'] / med['nvme-none']:.3f}")
    print(f"  forward/none, NVMe state      {med['nvme-forward'] / med['nvme-none']:.3f}")
    for name in ("block", "nvme"):
        made, undone, total = spec[name]
        print(f"  {name:5} block updates made during backward: {made} of {total}, {undone} undone")
    base = med["no-arithmetic"]
    for name in ("block", "nvme", "nvme-none"):
        print(f"  {name:9} adds {med[name] / base - 1:+7.1%} to the step without the update's arithmetic")
    if args.trace:
        out = Path(args.trace)
        cfg = load_config(
            None,
            [*TIMED_JOB, *shape, *PLACEMENTS["nvme"], f"train.max_steps={args.steps}"]
            + [f"output_dir={out}", "train.trace=true", "train.resume=never"],
        )
        run(cfg)
        busy, hidden, waited = trace_overlap(out / "trace.json")
        print(f"trace of an nvme run: {out / 'trace.json'} (open in ui.perfetto.dev), {out / 'memory.png'}")
        print(
            f"  NVMe busy {busy / args.steps:.1f} ms per step, {hidden / max(busy, 1e-9):.0%} of it during forward or backward"
        )
        print(f"  the compute waited {waited / args.steps:.1f} ms per step for optimizer state")


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def trace_overlap(path: Path) -> tuple[float, float, float]:
    """(ms the drive was busy, ms of that inside forward or backward, ms the compute waited for state)."""
    events = json.loads(path.read_text())["traceEvents"]
    track = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    spans = [(track[e["tid"]], e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e["ph"] == "X"]
    io = _union([(a, b) for t, _, a, b in spans if t.startswith("nvme")])
    compute = _union([(a, b) for t, n, a, b in spans if t == "compute" and n in ("forward", "backward")])
    hidden = sum(max(0.0, min(b, d) - max(a, c)) for a, b in io for c, d in compute)
    waited = sum(b - a for t, n, a, b in spans if t.startswith("compute") and n.endswith(" state"))
    return sum(b - a for a, b in io) / 1e3, hidden / 1e3, waited / 1e3


if __name__ == "__main__":
    main()
