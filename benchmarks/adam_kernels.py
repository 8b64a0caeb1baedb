"""The CPU AdamW kernels side by side: torch's fused AdamW, DeepSpeed's CPU Adam and the native kernel, in
one run, each with and without writing bf16 weights.

    bash scripts/venv-run python benchmarks/adam_kernels.py [--numel 100000000] [--rounds 5]

Every kernel updates the same flat fp32 buffers (weights, gradients, two moments: 16 bytes read and 12
written a parameter) in turn, round after round, so machine noise hits all of them: once as the update
alone, once also writing the new weights to a bf16 buffer (``out``: 2 more bytes written a parameter),
which the native kernel does in the same pass and torch's and DeepSpeed's with a separate copy after the
update. It prints each kernel's median params/s both ways and what ``out`` costs, each kernel's
throughput against torch's, the headline ratio (native with ``out`` against torch with ``out``: the same
pass against a separate copy), and the kernel ``optim.kernel=auto`` would take from these figures
(``tiertune probe`` records the same update-alone measurements in the machine profile). A kernel that
cannot run here is named and left out. DeepSpeed's op compiles on first use (a minute or two, once per
environment), the native kernel in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tiertune.errors import ConfigError
from tiertune.optim.kernels import KERNELS, choose, make_kernel

MODES = ("update", "with out")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    print(f"threads: {torch.get_num_threads()}; {args.numel / 1e6:.0f}M fp32 elements a step", flush=True)
    kernels = {}
    for name in KERNELS:
        try:
            kernels[name] = make_kernel(name)
        except ConfigError as e:
            print(f"no {name} kernel here: {'; '.join(e.problems)}")
    p, g = torch.randn(args.numel), torch.randn(args.numel) * 1e-3
    m, v = torch.zeros(args.numel), torch.zeros(args.numel)
    out = torch.empty(args.numel, dtype=torch.bfloat16)
    times: dict[tuple[str, str], list[float]] = {(name, mode): [] for name in kernels for mode in MODES}
    for r in range(args.rounds + 1):  # round 0 is warm-up
        for name, kernel in kernels.items():
            for mode in MODES:
                views = {"out": [out]} if mode == "with out" else {}
                t0 = time.perf_counter()
                kernel(
                    [p], [g], [m], [v], [r], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **views
                )
                if r:
                    times[name, mode].append(time.perf_counter() - t0)
    median = {key: statistics.median(t) for key, t in times.items()}
    rate = {key: args.numel / t for key, t in median.items()}
    print(
        f"{'kernel':<10} {'update s':>9} {'G params/s':>11} {'with out s':>11} {'G params/s':>11} {'out costs':>10}"
    )
    for name in kernels:
        update, with_out = median[name, "update"], median[name, "with out"]
        print(
            f"{name:<10} {update:>9.3f} {rate[name, 'update'] / 1e9:>11.2f} {with_out:>11.3f} "
            f"{rate[name, 'with out'] / 1e9:>11.2f} {with_out / update - 1:>+10.0%}"
        )
    for name in kernels:
        if name != "torch":
            print(
                f"{name}/torch throughput: {rate[name, 'update'] / rate['torch', 'update']:.2f} update alone, "
                f"{rate[name, 'with out'] / rate['torch', 'with out']:.2f} with out"
            )
    if "native" in kernels:
        headline = rate["native", "with out"] / rate["torch", "with out"]
        print(f"with bf16 weights out, native (same pass) / torch (separate copy): {headline:.2f}")
    measured = {name: rate[name, "update"] for name in kernels}
    print(f"optim.kernel=auto would take: {choose('auto', measured)}")


if __name__ == "__main__":
    main()
