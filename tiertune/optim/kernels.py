"""The CPU AdamW kernel: torch's fused AdamW or DeepSpeed's CPU Adam, whichever this machine runs faster.

Both update flat fp32 views in place (weights, gradients, two moments) with decoupled weight decay and
bias correction; a kernel is called once per group of views with the same hyperparameters. Their
arithmetic differs in the last bits (DeepSpeed multiplies by the reciprocal square root of the bias
correction and fuses multiply-adds where torch divides), so a run is reproducible with one kernel, and
torch's is the one that equals ``torch.optim.AdamW(fused=True)`` bit for bit.

``tiertune probe`` measures both (:func:`measure`) and records their rates in the machine profile;
``optim.kernel=auto`` then takes the faster (:func:`choose`). Without a profile that measured both, auto
is torch's: it needs no compiler, and a job's numbers do not change with a machine's noise.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch.optim.adamw import adamw

from tiertune.errors import ConfigError
from tiertune.offload.io import load_deepspeed_op

KERNELS = ("torch", "deepspeed")


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
    ) -> None:
        """One AdamW update of each view; ``steps[i]`` counts the updates ``params[i]`` had before."""


class TorchAdamW:
    """torch's fused CPU AdamW (``torch.optim.AdamW(fused=True)``'s kernel), on the views as given."""

    name = "torch"

    def __call__(self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay) -> None:
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


class DeepSpeedAdam:
    """DeepSpeed's CPU Adam op (AVX, OpenMP), compiled on first use (a minute or two, once per environment)."""

    name = "deepspeed"
    _ids = itertools.count(1 << 20)  # far from the ids DeepSpeed's own optimizers take

    def __init__(self) -> None:
        self._op = load_deepspeed_cpu_adam()
        self._id = next(self._ids)
        self._op.create_adam(self._id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)

    def __call__(self, params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay) -> None:
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

    def __del__(self) -> None:
        op = getattr(self, "_op", None)
        if op is not None:
            op.destroy_adam(self._id)


def load_deepspeed_cpu_adam():  # noqa: ANN201 (the op's module)
    """DeepSpeed's cpu_adam op, compiled if needed; a :class:`ConfigError` says why it cannot be."""
    return load_deepspeed_op(
        "CPUAdamBuilder", "optim.kernel=deepspeed", "optim.kernel=torch", lambda why: ConfigError([why])
    )


def make_kernel(name: str) -> AdamWKernel:
    if name == "torch":
        return TorchAdamW()
    if name == "deepspeed":
        return DeepSpeedAdam()
    raise ValueError(f"unknown AdamW kernel {name!r}: one of {', '.join(KERNELS)}")


def choose(setting: str, measured: Mapping[str, float]) -> str:
    """The kernel ``optim.kernel`` names; for ``auto``, the faster of those ``measured`` (params/s, from the
    machine profile) when both were measured, else torch."""
    if setting != "auto":
        return setting
    if all(measured.get(k, 0) > 0 for k in KERNELS):
        return max(KERNELS, key=lambda k: measured[k])
    return "torch"


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
