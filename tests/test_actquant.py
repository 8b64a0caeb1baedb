"""4-bit saved activations (S2A): the fitted derivative tables, and the gradients of the quantized ops
against autograd of the exact ones, within the bound each quantization gives."""

import math

import pytest
import torch
import torch.nn.functional as F

from tiertune.tuning import actquant
from tiertune.tuning.actquant import DERIVATIVES, LEVELS, fit_table, pack4, table, unpack4

OPS = {"silu": (actquant.silu, F.silu), "gelu": (actquant.gelu, F.gelu)}


def _spread(n: int, seed: int = 0) -> torch.Tensor:
    """Pre-activations from the bulk of a normal out to far tails."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, generator=g), torch.randn(n // 4, generator=g) * 12])


@pytest.mark.parametrize("name", DERIVATIVES)
def test_a_table_bounds_its_derivative_in_every_interval(name):
    t = table(name)
    assert t.edges.shape == (LEVELS - 1,) and t.levels.shape == (LEVELS,)
    assert bool((t.edges[1:] > t.edges[:-1]).all())
    x = torch.cat([_spread(200_000), torch.tensor([-1e4, -50.0, 50.0, 1e4]), t.edges])
    exact = DERIVATIVES[name](x.double())
    index = t.index(x).long()
    assert bool(((exact - t.levels.double()[index]).abs() <= t.bin_error.double()[index]).all())
    assert float(t.bin_error.max()) < 0.11  # 16 levels: a few hundredths in the bulk, ~0.1 in the tails


@pytest.mark.parametrize("name", DERIVATIVES)
def test_the_fit_beats_evenly_spaced_intervals(name):
    """The optimised edges give a smaller normal-weighted L2 error of the derivative than 16 intervals of
    equal width over the same span, each at its optimal level: the solver really minimises."""
    t = table(name)
    x = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    w, d = torch.exp(-0.5 * x * x), DERIVATIVES[name](x)

    def weighted_error(edges: torch.Tensor) -> float:
        which = torch.bucketize(x.float(), edges, right=True)
        mass = torch.zeros(LEVELS, dtype=torch.float64).index_add(0, which, w)
        mean = torch.zeros(LEVELS, dtype=torch.float64).index_add(0, which, w * d) / mass
        return float((w * (d - mean[which]) ** 2).sum())

    even = torch.linspace(-3, 3, LEVELS + 1)[1:-1]
    assert weighted_error(t.edges) < 0.8 * weighted_error(even)


def test_a_table_can_be_fitted_for_any_derivative():
    t = fit_table("tanh", lambda x: 1 - torch.tanh(x) ** 2, levels=8)
    assert t.levels.shape == (8,) and float(t.levels.max()) <= 1.0 and float(t.bin_error.max()) < 0.2


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_activation_gradients_stay_within_the_tables_bound(name, dtype):
    quantized, exact = OPS[name]
    x = _spread(2400)[:2999].to(dtype).view(1, 2999)  # an odd count: the last byte padded
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(x.shape, generator=gen).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = quantized(a), exact(b)
    assert torch.equal(ya, yb)  # the forward is exact
    ya.backward(upstream)
    yb.backward(upstream)
    t = table(name)
    bound = upstream.float().abs() * t.bin_error[t.index(x).long()]
    slack = 0.0 if dtype == torch.float32 else 2**-7 * upstream.float().abs() * 1.2  # bf16 rounding
    err = (a.grad.float() - b.grad.float()).abs()
    assert bool((err <= bound + slack + 1e-6).all())
    assert float(err.max()) > 0  # the backward really used the table


def test_quantized_softmax_gradients_stay_within_the_4_bit_bound():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 33, generator=gen) * 3
    upstream = torch.randn(x.shape, generator=gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = actquant.softmax(a, dim=-1), torch.softmax(b, dim=-1)
    assert torch.equal(ya, yb)
    ya.backward(upstream)
    yb.backward(upstream)
    y = yb.detach()
    eps = y.amax(dim=-1, keepdim=True) / (2 * (LEVELS - 1))  # half a quantization step, per row
    g = upstream.abs()
    # dx = y (g - <g, y>): with each saved y_j off by at most eps, dx_i moves by at most
    # eps (|g_i| + sum_j |g_j| (y_j + eps)) + (y_i + eps) eps sum_j |g_j|
    total = g.sum(dim=-1, keepdim=True)
    bound = eps * (g + (g * (y + eps)).sum(dim=-1, keepdim=True)) + (y + eps) * eps * total
    err = (a.grad - b.grad).abs()
    assert bool((err <= bound + 1e-6).all())
    assert float(err.max()) > 0


@pytest.mark.parametrize("op", ["silu", "gelu", "softmax"])
def test_what_backward_keeps_is_half_a_byte_an_element(op):
    """Saved-tensor hooks see what autograd keeps: 4 bits an element (and a scale per softmax row) where
    the exact op keeps the fp32 input or output."""
    quantized = {"silu": actquant.silu, "gelu": actquant.gelu, "softmax": actquant.softmax}[op]
    exact = {"silu": F.silu, "gelu": F.gelu, "softmax": lambda t: torch.softmax(t, -1)}[op]

    def saved_bytes(fn) -> int:
        kept = []
        x = torch.randn(64, 128, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
            fn(x)
        return sum(kept)

    ours, theirs = saved_bytes(quantized), saved_bytes(exact)
    assert theirs == 64 * 128 * 4
    assert ours == 64 * 128 // 2 + (64 * 4 if op == "softmax" else 0)


def test_four_bit_packing_round_trips():
    values = torch.randint(0, LEVELS, (1001,), dtype=torch.uint8)
    packed = pack4(values)
    assert packed.numel() == math.ceil(1001 / 2)
    assert torch.equal(unpack4(packed, 1001), values)


def _exact_norm(kind: str, x, weight, bias, eps):
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward(SimpleNamespace(weight=weight, variance_epsilon=eps), x)  # its own code


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norms_keep_8_bits_and_their_gradients_stay_within_the_bound(kind):
    """LayerNorm and Llama's RMSNorm: the forward is the model's own to the bit; the backward rebuilds the
    normalized input from 8 bits, each element within half a step (its row's absmax / 254) of the exact
    one, which bounds the gradients' error (derived in the comments)."""
    torch.manual_seed(0)
    eps = 1e-5
    x = torch.randn(3, 7, 48) * 3 + 1
    x[..., 5] *= 10  # an outlier feature, as trained models have: a coarse scale for its rows
    x.requires_grad_()
    weight = (torch.rand(48) + 0.5).requires_grad_()
    bias = torch.randn(48).requires_grad_() if kind == "layer" else None
    ours = actquant.layer_norm(x, weight, bias, eps) if kind == "layer" else actquant.rms_norm(x, weight, eps)
    exact = _exact_norm(kind, x, weight, bias, eps)
    assert torch.equal(ours, exact)
    g = torch.randn_like(exact)
    inputs = [t for t in (x, weight, bias) if t is not None]
    got, want = torch.autograd.grad(ours, inputs, g), torch.autograd.grad(exact, inputs, g)
    # with x^ off by e <= h (h: half a step), g' = g * weight and dx = rstd (g' - [mean g'] - x^ mean(g' x^)):
    # |dx~ - dx| <= rstd (h |mean(g' x^)| + |x^| h mean|g'| + h^2 mean|g'|); |dweight~ - dweight| <= sum |g| h
    xd = x.detach().double()
    centred = xd - xd.mean(-1, keepdim=True) if kind == "layer" else xd
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    xhat = centred * rstd
    h = xhat.abs().amax(-1, keepdim=True) / 254
    gw = g.double() * weight.detach().double()
    mean_abs = gw.abs().mean(-1, keepdim=True)
    bound_dx = rstd * (
        h * (gw * xhat).mean(-1, keepdim=True).abs() + xhat.abs() * h * mean_abs + h * h * mean_abs
    )
    assert ((got[0] - want[0]).abs() <= bound_dx + 1e-5).all()
    bound_dw = (g.double().abs() * h).sum((0, 1))
    assert ((got[1] - want[1]).abs() <= bound_dw + 1e-4).all()
    if kind == "layer":
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)  # dbias needs no x^
    assert (got[0] - want[0]).abs().max() > 1e-6  # the codes are really 8 bits (a control for the bounds)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        actquant.layer_norm(x, weight, bias, eps) if kind == "layer" else actquant.rms_norm(x, weight, eps)
    rows = 3 * 7
    assert sum(t.nbytes for t in kept if t is not weight) == rows * 48 + 2 * rows * 4  # codes, scale, rstd
