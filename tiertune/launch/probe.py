"""``tiertune probe``: measure the machine's tiers and write the profile the planner reads.

Measured: DRAM copy bandwidth; NVMe O_DIRECT write and read at a few queue depths and request sizes
(through the store's own I/O backend); host-to-device and device-to-host copies from pinned and pageable
memory on CUDA; copy bandwidth of each CXL node; CPU AdamW throughput. Each figure is the median of a few
repetitions; the machines are noisy, so the planner uses them for ratios and rough step times only.
"""

from __future__ import annotations

import errno
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from tiertune.errors import ConfigError
from tiertune.memory.numa import discover, numa_empty, select_cxl_nodes
from tiertune.memory.profile import MachineProfile
from tiertune.offload.io import ThreadPoolIO
from tiertune.optim.kernels import KERNELS, choose, make_kernel, measure

MIB = 2**20


def _median_gbps(nbytes: int, run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return round(nbytes / statistics.median(times) / 1e9, 3)


def dram_copy_gbps(nbytes: int, repeats: int, src: torch.Tensor | None = None) -> float:
    """Bytes read plus bytes written per second by a large memcpy (the convention of STREAM's copy)."""
    src = torch.ones(nbytes, dtype=torch.uint8) if src is None else src
    dst = torch.empty_like(src)
    return _median_gbps(2 * nbytes, lambda: dst.copy_(src), repeats)


def nvme_gbps(
    directory: Path, nbytes: int, queue_depths: list[int], block_sizes: list[int], repeats: int
) -> dict[str, float]:
    results: dict[str, float] = {}
    buffer = numa_empty(nbytes)
    buffer.random_(0, 255)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="tiertune-probe-") as tmp:
        try:
            fd = os.open(tmp.name, os.O_RDWR | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The store falls back to buffered I/O on such filesystems: measure what it would get.
            warnings.warn(f"{directory} refuses O_DIRECT; measuring buffered I/O there", stacklevel=2)
            fd = os.open(tmp.name, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            for qd in queue_depths:
                for bs in block_sizes:
                    tag = f"qd{qd}_bs{bs // 1024}k"
                    write, read = _timed_io(
                        ThreadPoolIO(queue_depth=qd, block_bytes=bs), fd, buffer, nbytes, repeats
                    )
                    results[f"write_{tag}"], results[f"read_{tag}"] = write, read
        finally:
            os.close(fd)
    return results


def _timed_io(
    io: ThreadPoolIO, fd: int, buffer: torch.Tensor, nbytes: int, repeats: int
) -> tuple[float, float]:
    pieces = io.split(fd, 0, 0, nbytes)

    def write() -> None:
        for f in [io.write(p, buffer) for p in pieces]:
            f.result()
        os.fsync(fd)

    def read() -> None:
        for f in [io.read(p, buffer) for p in pieces]:
            f.result()

    try:
        return _median_gbps(nbytes, write, repeats), _median_gbps(nbytes, read, repeats)
    finally:
        io.close()


def cuda_copy_gbps(nbytes: int, repeats: int) -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    out = {}
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for label, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

        def h2d(host: torch.Tensor = host) -> None:
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()  # the copy is asynchronous: time its completion, not its launch

        def d2h(host: torch.Tensor = host) -> None:
            host.copy_(dev, non_blocking=True)
            torch.cuda.synchronize()

        out[f"h2d_{label}"] = _median_gbps(nbytes, h2d, repeats)
        out[f"d2h_{label}"] = _median_gbps(nbytes, d2h, repeats)
    return out


def device_tflops(device: torch.device, repeats: int, n: int = 2048) -> float:
    """Dense matmul throughput on ``device`` (bf16 on CUDA, fp32 on CPU), in TFLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def matmul() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels are asynchronous: time their completion

    matmul()  # warm-up: kernel selection and allocation
    return round(_median_gbps(2 * n**3, matmul, repeats) / 1e3, 4)  # the helper's 1e9 units -> 1e12


def adam_kernel_rates(numel: int, repeats: int, progress: Callable[[str], None]) -> dict[str, float]:
    """Parameters per second through each CPU AdamW kernel that can run here (one step = read and write
    weights, grads, moments); a kernel that cannot (DeepSpeed absent or not compiling, no C compiler for
    the native one, or a native build that does not equal torch's kernel) is left out."""
    rates = {}
    for name in KERNELS:
        try:
            kernel = make_kernel(name)
        except ConfigError as e:
            progress(f"no {name} AdamW kernel: {'; '.join(e.problems)}")
            continue
        rates[name] = measure(kernel, numel, repeats)
    return rates


def probe(
    nvme_dirs: list[Path],
    nbytes: int = 256 * MIB,
    repeats: int = 3,
    queue_depths: tuple[int, ...] = (1, 4, 8),
    block_sizes: tuple[int, ...] = (128 * 1024, MIB, 4 * MIB),
    adamw_numel: int = 20_000_000,
    progress: Callable[[str], None] = lambda _: None,
) -> MachineProfile:
    progress("DRAM copy")
    dram = dram_copy_gbps(nbytes, repeats)
    progress("CPU AdamW kernels (built on first use: DeepSpeed's in a minute or two, native's in seconds)")
    kernels = adam_kernel_rates(adamw_numel, repeats, progress)
    progress("matmul throughput")
    tflops = device_tflops(torch.device("cuda" if torch.cuda.is_available() else "cpu"), repeats)
    nvme = {}
    for d in nvme_dirs:
        progress(f"NVMe O_DIRECT in {d}")
        nvme[str(d)] = nvme_gbps(d, nbytes, list(queue_depths), list(block_sizes), repeats)
    progress("CUDA copies" if torch.cuda.is_available() else "no CUDA device: skipping copies")
    cuda = cuda_copy_gbps(nbytes, repeats)
    cxl = {}
    for node in select_cxl_nodes(discover()):
        progress(f"CXL node {node.id}")
        cxl[str(node.id)] = dram_copy_gbps(nbytes, repeats, src=numa_empty(nbytes, nodes=[node.id]))
    return MachineProfile(
        cpus=os.cpu_count() or 1,
        host_total_bytes=psutil.virtual_memory().total,
        dram_copy_gbps=dram,
        # the kernel optim.kernel=auto takes
        cpu_adamw_params_per_s=kernels[choose("auto", kernels, native_builds=lambda: "native" in kernels)],
        device_tflops=tflops,
        nvme=nvme,
        cuda=cuda,
        cxl_copy_gbps=cxl,
        cpu_adam_kernels=kernels,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
