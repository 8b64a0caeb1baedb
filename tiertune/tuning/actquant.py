"""Activation-quantized backward for non-parametric ops (S2A): what SiLU, GELU and softmax save for
backward, in 4 bits instead of 16 or 32.

An elementwise activation ``y = f(x)`` needs ``f'(x)`` in backward, which autograd gets by saving ``x``.
Here the forward saves only which of 16 intervals of the real line ``x`` fell in (a 4-bit index, two to a
byte), and the backward multiplies the incoming gradient by that interval's derivative level: a
piecewise-constant fit of ``f'`` (:class:`DerivativeTable`). The intervals and levels are computed by
this module, not tabulated by hand: they minimise the L2 error of the derivative, weighted by a standard
normal density (the typical distribution of pre-activations), exactly, by dynamic programming over a fine
grid (:func:`fit_table`). Each interval's worst error is recorded, so the gradient's error is bounded
elementwise by ``|grad_out| * table.bin_error[index]``.

Softmax's backward needs its output ``y`` (``dx = y * (dy - sum(dy * y))``): the forward saves ``y``
quantized to 4 bits on a per-row scale (the row's maximum), so each saved probability is within
``scale / 30`` of the exact one.

Normalization layers (LayerNorm, RMSNorm) need their normalized input ``x^ = (x - mean) * rstd`` in
backward; :func:`layer_norm` and :func:`rms_norm` keep it in 8 bits (per-row absmax scale, so each element
is within ``absmax / 254`` of the exact one) beside one ``rstd`` a row.

The forward results are exact; only what is saved for backward is compressed: 0.5 bytes an element (plus
one scale a softmax row) where autograd keeps 2 (bf16) or 4 (fp32); 1 byte an element for the norms.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BITS = 4
LEVELS = 1 << BITS
GRID = 2001  # points of the fine grid the intervals' edges are chosen from
RANGE = 8.0  # the grid spans [-RANGE, RANGE]; the outer intervals reach to infinity


@dataclass(frozen=True)
class DerivativeTable:
    """A piecewise-constant fit of an activation's derivative: ``LEVELS`` intervals of the real line (split
    at ``edges``), a derivative ``level`` for each, and each interval's largest error ``bin_error`` (over
    the whole interval, its unbounded outer ones included)."""

    name: str
    edges: torch.Tensor  # LEVELS - 1 ascending boundaries, fp32
    levels: torch.Tensor  # LEVELS derivative values, fp32
    bin_error: torch.Tensor  # LEVELS bounds on |f'(x) - level| within each interval, fp32

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Which interval each element of ``x`` lies in (uint8, 0..LEVELS-1)."""
        return torch.bucketize(x.float(), self.edges, right=True).to(torch.uint8)


def _silu_prime(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_prime(x: torch.Tensor) -> torch.Tensor:  # the exact (erf) GELU
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": _silu_prime, "gelu": _gelu_prime}


def fit_table(
    name: str, derivative: Callable[[torch.Tensor], torch.Tensor], levels: int = LEVELS
) -> DerivativeTable:
    """The ``levels`` intervals and levels minimising the normal-weighted L2 error of ``derivative``.

    Over a grid of :data:`GRID` points on [-RANGE, RANGE], each interval is a run of consecutive grid cells
    and its level the weighted mean of the derivative over it (the L2-optimal constant); the runs are
    chosen by dynamic programming over the cells' prefix sums, which finds the exact optimum on the grid.
    """
    x = torch.linspace(-RANGE, RANGE, GRID, dtype=torch.float64)
    d = derivative(x)
    w = torch.exp(-0.5 * x * x)
    zero = torch.zeros(1, dtype=torch.float64)
    sw, swd, swdd = (torch.cat([zero, torch.cumsum(t, 0)]) for t in (w, w * d, w * d * d))

    # cost[i, j]: the weighted squared error of cells [i, j) around their weighted mean (inf unless i < j)
    i, j = torch.arange(GRID + 1)[:, None], torch.arange(GRID + 1)[None, :]
    mass, total = sw[j] - sw[i], swd[j] - swd[i]
    cost = (swdd[j] - swdd[i]) - total * total / mass.clamp_min(1e-300)
    cost = torch.where(i < j, cost.clamp_min(0.0), torch.full_like(cost, math.inf))
    n = GRID
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    start = []
    for _ in range(levels):  # best[j]: the least error covering cells [0, j) with the intervals so far
        best, at = (best[:, None] + cost).min(dim=0)
        start.append(at)
    cuts, j = [], n
    for at in reversed(start):
        cuts.append(j)
        j = int(at[j])
    bounds = [0, *reversed(cuts)]  # cell indices: interval k is cells [bounds[k], bounds[k + 1])
    lv = torch.stack([(swd[b] - swd[a]) / (sw[b] - sw[a]) for a, b in zip(bounds[:-1], bounds[1:])]).float()
    # boundaries halfway between the last cell of one interval and the first of the next
    edges = torch.tensor([float(x[b - 1] + x[b]) / 2 for b in bounds[1:-1]], dtype=torch.float32)
    return DerivativeTable(name, edges, lv, _interval_errors(derivative, edges, lv))


def _interval_errors(
    derivative: Callable[[torch.Tensor], torch.Tensor], edges: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """The largest |f'(x) - level| in each interval, over a grid far finer than the fit's and far wider
    (the derivatives here are monotone beyond it), with a small margin for the grid's spacing."""
    x = torch.linspace(-60.0, 60.0, 1_200_001, dtype=torch.float64)
    d = derivative(x)
    which = torch.bucketize(x.float(), edges, right=True)
    err = (d - levels.double()[which]).abs()
    out = torch.zeros(len(levels), dtype=torch.float64).scatter_reduce(0, which, err, "amax")
    return (out * 1.01 + 1e-6).float()


@functools.cache
def table(name: str) -> DerivativeTable:
    """The fitted table of ``silu`` or ``gelu`` (computed once a process, in about a second)."""
    if name not in DERIVATIVES:
        raise ValueError(f"no derivative table for {name!r}: one of {', '.join(DERIVATIVES)}")
    return fit_table(name, DERIVATIVES[name])


def pack4(index: torch.Tensor) -> torch.Tensor:
    """4-bit values (uint8, each < 16), flattened, two to a byte (the odd one out padded)."""
    flat = index.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack4`: ``numel`` values (uint8)."""
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return out[:numel]


class _Elementwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:  # noqa: ANN001 (autograd's ctx)
        t = table(name)
        ctx.name, ctx.shape = name, x.shape
        ctx.save_for_backward(pack4(t.index(x)))
        return F.silu(x) if name == "silu" else F.gelu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (packed,) = ctx.saved_tensors
        index = unpack4(packed, grad.numel()).long().view(ctx.shape)
        levels = table(ctx.name).levels.to(grad.device, grad.dtype)
        return grad * levels[index], None


def silu(x: torch.Tensor) -> torch.Tensor:
    """``F.silu(x)``, saving a 4-bit interval index for backward (see the module docstring)."""
    return _Elementwise.apply(x, "silu")


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x)`` (erf form), saving a 4-bit interval index for backward."""
    return _Elementwise.apply(x, "gelu")


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:  # noqa: ANN001
        y = torch.softmax(x, dim=dim)
        scale = y.amax(dim=dim, keepdim=True).float()
        q = torch.round(y.float() / scale * (LEVELS - 1)).to(torch.uint8)
        ctx.dim, ctx.shape, ctx.dtype = dim, y.shape, y.dtype
        ctx.save_for_backward(pack4(q), scale)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        packed, scale = ctx.saved_tensors
        y = unpack4(packed, grad.numel()).view(ctx.shape).float() * (scale / (LEVELS - 1))
        g = grad.float()
        dx = y * (g - (g * y).sum(dim=ctx.dim, keepdim=True))
        return dx.to(grad.dtype), None


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.softmax(x, dim)``, saving its output in 4 bits (per-row scale) for backward."""
    return _Softmax.apply(x, dim)


def quantize8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as int8 codes on a per-row (last dimension) absmax scale: ``codes * scale`` is within
    ``scale / 2`` of ``x`` elementwise."""
    x = x.detach().float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(x / scale).to(torch.int8), scale


def dequantize8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 values :func:`quantize8`'s codes stand for."""
    return codes.float() * scale


def _normalized(x: torch.Tensor, kind: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x^`` and ``rstd`` of a LayerNorm (``kind="layer"``) or an RMSNorm, in fp32."""
    x = x.detach().float()
    if kind == "layer":
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        return (x - mean) * rstd, rstd
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


class _Norm(torch.autograd.Function):
    """A LayerNorm or RMSNorm whose forward is ``exact(x)`` (the model's own computation) and whose
    backward rebuilds ``x^`` from 8 bits. With ``g' = grad * weight``:
    ``dx = rstd * (g' - mean(g') - x^ * mean(g' x^))`` (RMSNorm: without ``mean(g')``),
    ``dweight = sum(grad * x^)``, ``dbias = sum(grad)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, kind, eps, exact):  # noqa: ANN001, ANN205 (autograd's signature)
        y = exact(x)
        xhat, rstd = _normalized(x, kind, eps)
        codes, scale = quantize8(xhat)
        ctx.kind, ctx.x_dtype = kind, x.dtype
        ctx.save_for_backward(codes, scale, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        codes, scale, rstd, weight = ctx.saved_tensors
        xhat = dequantize8(codes, scale)
        g = grad.float()
        gw = g * weight.float() if weight is not None else g
        proj = (gw * xhat).mean(-1, keepdim=True)
        centred = gw - gw.mean(-1, keepdim=True) if ctx.kind == "layer" else gw
        dx = (rstd * (centred - xhat * proj)).to(ctx.x_dtype)
        rows = g.reshape(-1, g.shape[-1])
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (rows * xhat.reshape(rows.shape)).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = rows.sum(0).to(weight.dtype if weight is not None else grad.dtype)
        return dx, dweight, dbias, None, None, None


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension, keeping the normalized input in 8 bits for backward."""
    return _Norm.apply(
        x, weight, bias, "layer", eps, lambda t: F.layer_norm(t, t.shape[-1:], weight, bias, eps)
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps))`` computed in fp32, cast back to ``x``'s dtype
    before the weight), keeping the normalized input in 8 bits for backward."""

    return _Norm.apply(x, weight, None, "rms", eps, lambda t: exact_rms_norm(t, weight, eps))


def exact_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as the model computes it: normalized in fp32, cast back, then scaled."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
