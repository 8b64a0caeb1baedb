"""The CPU AdamW kernels side by side: torch's fused AdamW against DeepSpeed's CPU Adam, in one run.

    bash scripts/venv-run python benchmarks/adam_kernels.py [--numel 100000000] [--rounds 5]

Both update the same flat fp32 buffers (weights, gradients, two moments: 16 bytes read and 12 written a
parameter) in turn, round after round, so machine noise hits both. It prints each kernel's median
params/s, the ratio deepspeed/torch, and the kernel ``optim.kernel=auto`` would take from these figures
(``tiertune probe`` records the same two measurements in the machine profile). DeepSpeed's op compiles on
first use (a minute or two, once per environment).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tiertune.optim.kernels import KERNELS, choose, make_kernel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    print(f"threads: {torch.get_num_threads()}; {args.numel / 1e6:.0f}M fp32 elements a step", flush=True)
    kernels = {name: make_kernel(name) for name in KERNELS}
    p, g = torch.randn(args.numel), torch.randn(args.numel) * 1e-3
    m, v = torch.zeros(args.numel), torch.zeros(args.numel)
    times: dict[str, list[float]] = {name: [] for name in KERNELS}
    for r in range(args.rounds + 1):  # round 0 is warm-up
        for name, kernel in kernels.items():
            t0 = time.perf_counter()
            kernel([p], [g], [m], [v], [r], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
            if r:
                times[name].append(time.perf_counter() - t0)
    rates = {name: args.numel / statistics.median(t) for name, t in times.items()}
    print(f"{'kernel':<10} {'median s':>9} {'G params/s':>11}")
    for name in KERNELS:
        print(f"{name:<10} {statistics.median(times[name]):>9.3f} {rates[name] / 1e9:>11.2f}")
    print(f"deepspeed/torch throughput: {rates['deepspeed'] / rates['torch']:.2f}")
    print(f"optim.kernel=auto would take: {choose('auto', rates)}")


if __name__ == "__main__":
    main()
