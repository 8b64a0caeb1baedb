"""The CPU AdamW kernel: torch's fused AdamW, a native kernel equal to it bit for bit, or DeepSpeed's CPU
Adam, whichever this machine runs fastest.

Each updates flat fp32 views in place (weights, gradients, two moments) with decoupled weight decay and
bias correction; a kernel is called once per group of views with the same hyperparameters, and can also
write the new weights rounded to bf16 (``out``: the 16-bit copy a mixed-precision run computes with).
torch's (``TorchAdamW``) is ``torch.optim.AdamW(fused=True)``'s kernel. The native one
(:mod:`tiertune.optim.native`: plain C, compiled with ``cc`` on first use, in seconds) reproduces its
arithmetic bit for bit, checked against it whenever it is loaded, and writes ``out`` in the same pass
where the others copy afterwards. DeepSpeed's differs in the last bits (it multiplies by the reciprocal
square root of the bias correction and fuses multiply-adds where torch divides), so a run is reproducible
with one kernel, and equal to ``torch.optim.AdamW(fused=True)`` with torch's or the native one.

``tiertune probe`` measures each kernel that runs here (:func:`measure`) and records their rates in the
machine profile; ``optim.kernel=auto`` then takes the fastest (:func:`choose`). Without a profile that
measured several, auto is the native kernel where it builds (its numbers are torch's, only faster), else
torch's, which needs no compiler.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import statistics
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Protocol

import torch
from torch.optim.adamw import adamw

from tiertune.errors import ConfigError
from tiertune.offload.io import load_deepspeed_op
from tiertune.optim import native

KERNELS = ("torch", "deepspeed", "native")
# DeepSpeed's kernel rounds differently from torch's (so a job's numbers change with the choice): auto takes
# it over an exact kernel only when the profile measured it at least this much faster, not within noise.
DEEPSPEED_MARGIN = 1.05


class AdamWKernel(Protocol):
    name: str

    def __call__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        exp_avg_sqs: Sequence[torch.Tensor],
        steps: Sequence[int],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        out: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """One AdamW update of each view; ``steps[i]`` counts the updates ``params[i]`` had before. With
        ``out`` (bf16 views, one per param view, as many elements), ``out[i]`` receives the updated
        ``params[i]`` as ``params[i].to(torch.bfloat16)`` gives it."""


class TorchAdamW:
    """torch's fused CPU AdamW (``torch.optim.AdamW(fused=True)``'s kernel), on the views as given."""

    name = "torch"

    def __call__(
        self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay, out=None
    ) -> None:
        device = params[0].device
        adamw(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            [],
            [torch.tensor(float(s), device=device) for s in steps],  # the kernel adds 1
            fused=True,
            amsgrad=False,
            beta1=betas[0],
            beta2=betas[1],
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            maximize=False,
        )
        _copy_out(params, out)


class DeepSpeedAdam:
    """DeepSpeed's CPU Adam op (AVX, OpenMP), compiled on first use (a minute or two, once per environment)."""

    name = "deepspeed"
    _ids = itertools.count(1 << 20)  # far from the ids DeepSpeed's own optimizers take

    def __init__(self) -> None:
        self._op = load_deepspeed_cpu_adam()
        self._id = next(self._ids)
        self._op.create_adam(self._id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)

    def __call__(
        self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay, out=None
    ) -> None:
        for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                raise ValueError("DeepSpeed's CPU Adam updates contiguous tensors only")
            # The op keeps beta**step per optimizer id and advances it by one multiplication when called
            # with the next step, else computes pow(): the last bit would depend on which tensor came
            # before. A fresh id state for every tensor makes it pow(beta, step) each time.
            self._op.create_adam(self._id, lr, betas[0], betas[1], eps, weight_decay, True, False)
            self._op.adam_update(
                self._id, step + 1, lr, betas[0], betas[1], eps, weight_decay, True, p, g, m, v
            )
        _copy_out(params, out)

    def __del__(self) -> None:
        op = getattr(self, "_op", None)
        if op is not None:
            op.destroy_adam(self._id)


def load_deepspeed_cpu_adam():  # noqa: ANN201 (the op's module)
    """DeepSpeed's cpu_adam op, compiled if needed; a :class:`ConfigError` says why it cannot be."""
    return load_deepspeed_op(
        "CPUAdamBuilder", "optim.kernel=deepspeed", "optim.kernel=torch", lambda why: ConfigError([why])
    )


class NativeAdamW:
    """torch's fused CPU AdamW bit for bit, as plain C (:mod:`tiertune.optim.native`: OpenMP on torch's
    thread count) that writes ``out`` in the same pass over memory; compiled on first use (seconds, once
    per environment and CPU model). It updates contiguous CPU views in distinct buffers."""

    name = "native"

    def __init__(self, library: ctypes.CDLL | None = None) -> None:
        """``library``: the compiled kernel to call; by default :func:`load_native`'s, checked."""
        self._update = (library or load_native()).tiertune_adamw

    def __call__(
        self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay, out=None
    ) -> None:
        _check_out(params, out)
        outs = [None] * len(params) if out is None else out
        views = list(zip(params, grads, exp_avgs, exp_avg_sqs, outs, steps))
        sizes = [_native_view(i, *view[:5]) for i, view in enumerate(views)]  # all, before any update
        beta1, beta2 = betas
        decay = _decay(lr, weight_decay)
        threads = torch.get_num_threads()  # as many as torch's kernel would run on
        for (p, g, m, v, o, step), n in zip(views, sizes):
            # torch counts updates in a float32 tensor and adds 1 before the update, as here
            step = _float32(_float32(step) + 1.0)
            step_size = lr / (1 - beta1**step)
            bias_correction2_sqrt = math.sqrt(1 - beta2**step)
            self._update(
                p.data_ptr(),
                g.data_ptr(),
                m.data_ptr(),
                v.data_ptr(),
                None if o is None else o.data_ptr(),
                n,
                decay,
                1 - beta1,
                beta2,
                1 - beta2,
                bias_correction2_sqrt,
                eps,
                -step_size,
                threads,
            )


@functools.lru_cache(maxsize=64)
def _decay(lr: float, weight_decay: float) -> float:
    """``1 - lr * weight_decay`` as torch's kernel computes it: one fused multiply-add in double, so the
    exact value rounded once."""
    return float(1 - Fraction(lr) * Fraction(weight_decay))


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _native_view(
    i: int, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, o: torch.Tensor | None
) -> int:
    """The number of elements of view ``i``, or a ValueError saying which tensor the kernel cannot take."""
    n = p.numel()
    for what, t in zip(("params", "grads", "exp_avgs", "exp_avg_sqs", "out"), (p, g, m, v, o)):
        dtype = torch.bfloat16 if what == "out" else torch.float32
        if t is not None and not (t.dtype == dtype and t.is_cpu and t.is_contiguous() and t.numel() == n):
            layout = "contiguous" if t.is_contiguous() else "strided"
            raise ValueError(
                f"the native AdamW kernel takes contiguous CPU {dtype} views of {n} elements as {what}[{i}], "
                f"not a {layout} {t.device.type} {t.dtype} tensor of {t.numel()}"
            )
    return n


def _check_out(params: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | None) -> None:
    if out is not None and len(out) != len(params):
        raise ValueError(f"out has {len(out)} views for {len(params)} params")


def _copy_out(params: Sequence[torch.Tensor], out: Sequence[torch.Tensor] | None) -> None:
    """The bf16 weights, copied from the updated ``params``: what the native kernel writes as it updates."""
    _check_out(params, out)
    for o, p in zip(out or (), params):
        o.copy_(p)


def load_native() -> ctypes.CDLL:
    """The native kernel's library, compiled if needed, loaded and checked against torch's kernel once per
    process; a :class:`ConfigError` says why it cannot be used here."""
    library, problem = _native()
    if library is None:
        raise ConfigError([problem])
    return library


def native_available() -> bool:
    """Whether the native kernel builds here and equals torch's (compiles and checks it on first call)."""
    return _native()[0] is not None


@functools.cache
def _native() -> tuple[ctypes.CDLL | None, str]:
    try:
        library = native.load()
    except ConfigError as e:
        return None, e.problems[0]
    problem = _differs_from_torch(NativeAdamW(library))
    return (None, problem) if problem else (library, "")


def _differs_from_torch(kernel: NativeAdamW) -> str:
    """How ``kernel`` differs from torch's over a few updates of random tensors, or "" when every bit of
    the weights, moments and bf16 weights agrees. The sizes are ragged so that both torch's vector loop
    and its scalar tail show; gradients span 1e-8 to 1e3, weights include NaN and infinities."""
    gen = torch.Generator().manual_seed(0)
    sizes = (3001, 37, 5, 1)
    for weight_decay, betas in ((0.1, (0.9, 0.999)), (0.0, (0.9, 0.95))):
        start = [torch.randn(n, generator=gen) for n in sizes]
        start[0][:3] = torch.tensor([math.nan, math.inf, -math.inf])
        grads = [[torch.randn(n, generator=gen) * torch.logspace(-8, 3, n) for n in sizes] for _ in range(3)]
        runs = {}
        for run in (TorchAdamW(), kernel):
            p = [x.clone() for x in start]
            m, v = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
            out = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
            for step, g in enumerate(grads):
                hyper = {"lr": 1e-3, "betas": betas, "eps": 1e-8, "weight_decay": weight_decay}
                run(p, g, m, v, [step] * len(sizes), out=out, **hyper)
            runs[run.name] = {"weights": p, "exp_avg": m, "exp_avg_sq": v, "bf16 weights": out}
        for what, theirs in runs["torch"].items():
            for a, b in zip(theirs, runs["native"][what]):
                bits = torch.int32 if a.dtype == torch.float32 else torch.int16
                differ = a.view(bits) != b.view(bits)
                if differ.any():
                    i = int(differ.nonzero()[0])
                    return (
                        f"optim.kernel=native: the native AdamW kernel does not reproduce torch's fused AdamW "
                        f"on this machine: {what} differ in {int(differ.sum())} of {a.numel()} elements "
                        f"(e.g. {b[i].item()!r} where torch's is {a[i].item()!r}; weight_decay={weight_decay}, "
                        f"betas={betas}); set optim.kernel=torch"
                    )
    return ""


def make_kernel(name: str) -> AdamWKernel:
    if name == "torch":
        return TorchAdamW()
    if name == "deepspeed":
        return DeepSpeedAdam()
    if name == "native":
        return NativeAdamW()
    raise ValueError(f"unknown AdamW kernel {name!r}: one of {', '.join(KERNELS)}")


def choose(
    setting: str, measured: Mapping[str, float], native_builds: Callable[[], bool] = native_available
) -> str:
    """The kernel ``optim.kernel`` names. For ``auto``: the fastest of those ``measured`` (params/s, from
    the machine profile) when it measured several, DeepSpeed's only when it is faster than the fastest exact
    one by :data:`DEEPSPEED_MARGIN` (its numbers differ from torch's); else native where ``native_builds()``
    (by default: it compiles here and equals torch's kernel; it changes nothing but the speed), else torch."""
    if setting != "auto":
        return setting
    candidates = [k for k in KERNELS if measured.get(k, 0) > 0]
    if len(candidates) > 1:
        exact = [k for k in candidates if k != "deepspeed"]
        best = max(exact, key=lambda k: measured[k])  # a tie: the first in KERNELS
        if measured.get("deepspeed", 0) > DEEPSPEED_MARGIN * measured[best]:
            return "deepspeed"
        return best
    return "native" if native_builds() else "torch"


def measure(kernel: AdamWKernel, numel: int, repeats: int) -> float:
    """Params/s of one update of ``numel`` fp32 elements (the median of ``repeats``, after a warm-up)."""
    p, g, m = torch.randn(numel), torch.randn(numel), torch.zeros(numel)
    v = torch.zeros(numel)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        kernel([p], [g], [m], [v], [i], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        times.append(time.perf_counter() - t0)
    return round(numel / statistics.median(times[1:]))
