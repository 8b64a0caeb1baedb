"""The CPU AdamW kernels against torch.optim.AdamW, and how optim.kernel=auto chooses between them."""

import sys

import pytest
import torch

from tiertune.errors import ConfigError
from tiertune.optim.kernels import TorchAdamW, choose, load_deepspeed_cpu_adam, make_kernel, measure

HYPER = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}


def _against_torch(kernel, steps=5):
    """The kernel and torch.optim.AdamW(fused=True) over the same gradients: decayed and not decayed
    tensors, several steps; returns (kernel's, torch's) weights and moments."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (33,), (1000,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    decay = [0.1, 0.0, 0.1]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(
        [{"params": [r], "weight_decay": d} for r, d in zip(ref, decay)], fused=True, **HYPER
    )
    mine = [p.clone().reshape(-1) for p in params]
    ms = [torch.zeros_like(p) for p in mine]
    vs = [torch.zeros_like(p) for p in mine]
    for step in range(steps):
        grads = [torch.randn(s, generator=g) * 10 ** -(step % 3) for s in shapes]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        for i, d in enumerate(decay):
            kernel([mine[i]], [grads[i].reshape(-1)], [ms[i]], [vs[i]], [step], weight_decay=d, **HYPER)
    theirs = [(r.detach().reshape(-1), opt.state[r]["exp_avg"].reshape(-1)) for r in ref]
    return list(zip(mine, ms)), theirs


def test_the_torch_kernel_is_torch_adamw_bit_for_bit():
    mine, theirs = _against_torch(TorchAdamW())
    assert all(torch.equal(a, b) and torch.equal(m, n) for (a, m), (b, n) in zip(mine, theirs))


def test_deepspeeds_kernel_agrees_with_torch_adamw_to_rounding():
    """DeepSpeed's CPU Adam (compiled on first use) computes the same update, rounded differently."""
    mine, theirs = _against_torch(make_kernel("deepspeed"))
    for (a, m), (b, n) in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        # Moments near zero (gradients that nearly cancel) carry the per-step rounding as a larger
        # relative error: observed 3.5e-5 relative, 2.6e-8 absolute.
        torch.testing.assert_close(m, n, rtol=1e-4, atol=1e-7)


def test_auto_takes_the_faster_measured_kernel_and_torch_without_measurements():
    assert choose("auto", {}) == "torch"
    assert choose("auto", {"torch": 2.0e9}) == "torch"  # only one measured: nothing to choose between
    assert choose("auto", {"torch": 2.0e9, "deepspeed": 2.4e9}) == "deepspeed"
    assert choose("auto", {"torch": 2.4e9, "deepspeed": 2.0e9}) == "torch"
    assert choose("deepspeed", {"torch": 9e9, "deepspeed": 1.0}) == "deepspeed"  # asked for: taken


def test_measure_reports_params_per_second():
    assert measure(TorchAdamW(), 100_000, 2) > 0


def test_without_deepspeed_the_kernel_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.ops.op_builder", None)  # import fails as if absent
    with pytest.raises(
        ConfigError, match=r"optim.kernel=deepspeed: DeepSpeed is not installed.*optim.kernel=torch"
    ):
        load_deepspeed_cpu_adam()


def test_deepspeeds_kernel_gives_the_same_bits_whatever_came_before():
    """The op keeps beta**step per optimizer; it must not matter which tensor it updated before (blocks
    run in another order when updated during backward) or whether it is a fresh one (a resumed run)."""

    def train(order, first=0, last=60, state=None, kernel=None):
        kernel = kernel or make_kernel("deepspeed")
        g = torch.Generator().manual_seed(1)
        state = state or {
            k: [torch.randn(777, generator=g), torch.zeros(777), torch.zeros(777)] for k in "ab"
        }
        for step in range(first, last):
            grads = {
                k: torch.randn(777, generator=torch.Generator().manual_seed(step * 2 + (k == "b")))
                for k in "ab"
            }
            for k in order:
                p, m, v = state[k]
                kernel([p], [grads[k]], [m], [v], [step], weight_decay=0.1, **HYPER)
        return state

    ab, ba = train("ab"), train("ba")
    assert all(torch.equal(x, y) for k in "ab" for x, y in zip(ab[k], ba[k]))
    # Another kernel instance from step 40 on: beta**40 computed at once, not as 40 products in float.
    resumed = train("ab", first=40, state=train("ab", last=40))
    assert all(torch.equal(x, y) for k in "ab" for x, y in zip(ab[k], resumed[k]))
