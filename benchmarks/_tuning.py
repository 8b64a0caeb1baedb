"""What the tuning benchmarks share: running a job in its own process, peak RSS (and peak device memory
on CUDA), the vanilla baseline's training loop, and counting the activations a training micro-batch
keeps for backward."""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiertune(*args: str) -> None:
    """``tiertune ARGS`` in a process of its own; exits with its stderr's tail if it fails."""
    done = subprocess.run([sys.executable, "-m", "tiertune", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tiertune {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def peak_rss() -> int:
    """This process's peak resident set, in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device() -> object:
    """Where the vanilla baseline runs: the GPU when there is one (as tiertune's jobs do), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(batch: dict) -> dict:
    """``batch``'s tensors on :func:`device`."""
    return {k: v.to(device()) for k, v in batch.items()}


def peak_device() -> int | None:
    """This process's peak allocated device memory, in bytes (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def print_device_peaks(results: dict[str, dict]) -> None:
    """A second table, on CUDA only: each variant's peak device memory against the baseline's (the first)."""
    peaks = {name: r.get("peak_device") for name, r in results.items()}
    ref = next(iter(peaks.values()))
    if not ref:
        return
    print("\n| variant | peak device memory | x peft |\n|---|---|---|")
    for name, peak in peaks.items():
        shown = f"{peak / 2**20:.0f} MiB | {peak / ref:.2f}" if peak else "- | -"
        print(f"| {name} | {shown} |")


def saved_bytes(model: object, forward_backward: Callable[[], None]) -> int:
    """Bytes of what ``forward_backward`` (a training micro-batch through ``model``) keeps for backward,
    counted with saved-tensor hooks: each storage once, the model's weights not counted."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            seen[key] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_backward()
    return sum(seen.values())


def train_plain(model: object, stream: object, optim: object, steps: int, loss: Callable) -> list[float]:
    """The vanilla baseline's loop: ``steps`` steps of ``loss(batch)`` (a scalar mean over the batch's
    targets) on the batches of ``stream`` (moved to :func:`device`, where ``model`` must be), gradients clipped to ``optim.max_grad_norm``, fused AdamW at
    the job's lr schedule. Returns each step's seconds."""
    import time

    import torch

    from tiertune.optim import lr_at

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), fused=True)
    times = []
    model.train()
    cuda = device().type == "cuda"
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss(on_device(stream.next_batch())).backward()
        torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, optim, steps)
        opt.step()
        opt.zero_grad()
        if cuda:  # the step's kernels done before its time is taken
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times
