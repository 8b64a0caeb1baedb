"""The CPU AdamW kernels against torch.optim.AdamW, their bf16 weights, and how optim.kernel=auto chooses
between them."""

import shutil
import sys

import pytest
import torch

from tiertune.errors import ConfigError
from tiertune.optim import kernels, native
from tiertune.optim.kernels import (
    KERNELS,
    NativeAdamW,
    TorchAdamW,
    choose,
    load_deepspeed_cpu_adam,
    make_kernel,
    measure,
)

HYPER = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}
SHAPES = [(64, 33), (33,), (1000,)]
# Ragged sizes (torch's kernel computes a tensor's last n % 8 elements apart), down to one element, and
# one large enough for the native kernel to run on several threads.
RAGGED = [(64, 33), (33,), (1000,), (5,), (1,), (300, 257)]


def _against_torch(kernel, steps=5, shapes=SHAPES, scales=(1.0, 0.1, 0.01), betas=HYPER["betas"], out=False):
    """The kernel and torch.optim.AdamW(fused=True) over the same gradients (``scales[step % len]`` times
    normal ones): decayed and not decayed tensors, several steps. Returns the kernel's and torch's
    (weights, exp_avg, exp_avg_sq) of each tensor, and with ``out`` the bf16 weights the kernel wrote."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in shapes]
    decay = [0.1 if i % 2 == 0 else 0.0 for i in range(len(shapes))]
    hyper = {**HYPER, "betas": betas}
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(
        [{"params": [r], "weight_decay": d} for r, d in zip(ref, decay)], fused=True, **hyper
    )
    mine = [p.clone().reshape(-1) for p in params]
    ms = [torch.zeros_like(p) for p in mine]
    vs = [torch.zeros_like(p) for p in mine]
    outs = [torch.empty_like(p, dtype=torch.bfloat16) for p in mine] if out else None
    for step in range(steps):
        grads = [torch.randn(s, generator=g) * scales[step % len(scales)] for s in shapes]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        for i, d in enumerate(decay):
            views = {"out": [outs[i]]} if out else {}
            kernel(
                [mine[i]], [grads[i].reshape(-1)], [ms[i]], [vs[i]], [step], weight_decay=d, **hyper, **views
            )
    theirs = [
        tuple(t.detach().reshape(-1) for t in (r, opt.state[r]["exp_avg"], opt.state[r]["exp_avg_sq"]))
        for r in ref
    ]
    return list(zip(mine, ms, vs)), theirs, outs


def _compiled() -> NativeAdamW:
    """The compiled native kernel itself, not behind the check against torch's that load_native runs."""
    return NativeAdamW(native.load())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


@pytest.fixture
def threads(request):
    """torch's thread count for one test (the native kernel runs on as many, torch's on its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_the_torch_kernel_is_torch_adamw_bit_for_bit():
    mine, theirs, _ = _against_torch(TorchAdamW())
    assert all(_same_bits(a, b) for x, y in zip(mine, theirs) for a, b in zip(x, y))


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95)])
@pytest.mark.parametrize("out", [False, True], ids=["update", "with-out"])
def test_the_native_kernel_is_torch_adamw_bit_for_bit(threads, betas, out):
    """Weights and both moments, every bit, over gradients from 1e-8 to 1e3, with or without bf16 weights
    written in the same pass."""
    mine, theirs, outs = _against_torch(
        _compiled(), steps=8, shapes=RAGGED, scales=(1e-8, 1e-3, 1.0, 1e3), betas=betas, out=out
    )
    for shape, x, y in zip(RAGGED, mine, theirs):
        for what, a, b in zip(("weights", "exp_avg", "exp_avg_sq"), x, y):
            assert _same_bits(a, b), f"{what} of {shape}: {int((_bits(a) != _bits(b)).sum())} elements differ"
    if out:
        assert all(_same_bits(o, p.to(torch.bfloat16)) for o, (p, _, _) in zip(outs, mine))


def test_the_native_kernel_updates_views_of_one_buffer_as_torchs_does():
    """The blocks' layout: views at any offset of flat buffers, several per call."""
    g = torch.Generator().manual_seed(2)
    cuts = [0, 3, 517, 520, 2048, 70_001]
    start = torch.randn(cuts[-1], generator=g)
    results = []
    for kernel in (TorchAdamW(), _compiled()):
        p, m, v = start.clone(), torch.zeros(cuts[-1]), torch.zeros(cuts[-1])
        out = torch.empty(cuts[-1], dtype=torch.bfloat16)
        views = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
        for step in range(3):
            grad = torch.randn(cuts[-1], generator=torch.Generator().manual_seed(step))
            kernel(
                *([t[s] for s in views] for t in (p, grad, m, v)),
                [step] * len(views),
                weight_decay=0.1,
                out=[out[s] for s in views],
                **HYPER,
            )
        results.append((p, m, v, out))
    assert all(_same_bits(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("name", KERNELS)
def test_every_kernel_writes_out_as_the_weights_in_bf16(name):
    mine, _, outs = _against_torch(make_kernel(name), steps=3, shapes=RAGGED[:5], out=True)
    assert all(_same_bits(o, p.to(torch.bfloat16)) for o, (p, _, _) in zip(outs, mine))


def test_the_native_kernels_bf16_rounding_is_torchs_on_every_kind_of_float():
    """Random bit patterns (NaNs with any sign and payload, infinities, subnormals, zeros), values halfway
    between two bf16 numbers, and the largest floats (which round to infinity). With lr=0 and a zero
    gradient the update leaves every weight as it was (a signalling NaN comes back quiet, from both)."""
    bits = torch.randint(
        -(2**31), 2**31, (10_001,), generator=torch.Generator().manual_seed(3), dtype=torch.int64
    )
    special = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F7FFFFF, 0xFF7FFFFF, 0x80000000]
    special += [0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x00008000, 0x00018000, 0x7F7F8000]
    bits = torch.cat([bits, torch.tensor(special)])
    start = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    results = []
    for kernel in (TorchAdamW(), _compiled()):
        p, n = start.clone(), start.numel()
        out = torch.empty(n, dtype=torch.bfloat16)
        kernel(
            [p],
            [torch.zeros(n)],
            [torch.zeros(n)],
            [torch.zeros(n)],
            [0],
            out=[out],
            lr=0.0,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
        )
        assert _same_bits(out, p.to(torch.bfloat16))
        results.append((p, out))
    (torch_p, torch_out), (native_p, native_out) = results
    assert _same_bits(native_p, torch_p) and _same_bits(native_out, torch_out)
    assert _same_bits(native_p[~torch.isnan(start)], start[~torch.isnan(start)])


@pytest.mark.parametrize(
    "bad, named",
    [
        ("strided params", r"as params\[0\], not a strided"),
        ("float64 grads", r"as grads\[0\], not .* torch.float64"),
        ("bf16 params", r"as params\[0\], not .* torch.bfloat16"),
        ("fp32 out", r"torch.bfloat16 views of 64 elements as out\[0\], not .* torch.float32"),
        ("short out", r"as out\[0\], not .* of 63"),
        ("short exp_avg_sq", r"as exp_avg_sqs\[0\], not .* of 63"),
        ("out list", r"out has 2 views for 1 params"),
    ],
)
def test_the_native_kernel_rejects_what_it_cannot_update(bad, named):
    n = 64
    p, g, m, v = (torch.zeros(n) for _ in range(4))
    out = [torch.zeros(n, dtype=torch.bfloat16)]
    if bad == "strided params":
        p = torch.zeros(2 * n)[::2]
    elif bad == "float64 grads":
        g = g.double()
    elif bad == "bf16 params":
        p = p.bfloat16()
    elif bad == "fp32 out":
        out = [torch.zeros(n)]
    elif bad == "short out":
        out = [out[0][1:]]
    elif bad == "short exp_avg_sq":
        v = v[1:]
    else:
        out = out * 2
    with pytest.raises(ValueError, match=named):
        _compiled()([p], [g], [m], [v], [0], out=out, weight_decay=0.1, **HYPER)


def test_deepspeeds_kernel_agrees_with_torch_adamw_to_rounding():
    """DeepSpeed's CPU Adam (compiled on first use) computes the same update, rounded differently."""
    mine, theirs, _ = _against_torch(make_kernel("deepspeed"))
    for (a, m, _), (b, n, _) in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        # Moments near zero (gradients that nearly cancel) carry the per-step rounding as a larger
        # relative error: observed 3.5e-5 relative, 2.6e-8 absolute.
        torch.testing.assert_close(m, n, rtol=1e-4, atol=1e-7)


def test_auto_takes_the_fastest_measured_kernel_else_native_where_it_builds():
    def unasked():
        raise AssertionError("several kernels measured: no need to ask whether native builds")

    assert choose("auto", {}, native_builds=lambda: True) == "native"
    assert choose("auto", {}, native_builds=lambda: False) == "torch"
    # only one measured: nothing to choose between
    assert choose("auto", {"torch": 2.0e9}, native_builds=lambda: True) == "native"
    assert choose("auto", {"torch": 2.0e9, "deepspeed": 0.0}, native_builds=lambda: False) == "torch"
    assert choose("auto", {"torch": 2.0e9, "deepspeed": 2.4e9}, native_builds=unasked) == "deepspeed"
    assert choose("auto", {"torch": 2.4e9, "deepspeed": 2.0e9}, native_builds=unasked) == "torch"
    # DeepSpeed's rounds differently: taken over an exact kernel only when clearly faster, not within noise
    assert choose("auto", {"torch": 2.0e9, "deepspeed": 2.06e9}, native_builds=unasked) == "torch"
    three = {"torch": 2.0e9, "deepspeed": 2.4e9, "native": 2.6e9}
    assert choose("auto", three, native_builds=unasked) == "native"
    assert choose("auto", {**three, "native": 1.0e9}, native_builds=unasked) == "deepspeed"
    assert choose("auto", {"torch": 2.0e9, "native": 2.0e9}, native_builds=unasked) == "torch"  # a tie
    assert choose("deepspeed", {"torch": 9e9, "deepspeed": 1.0}, native_builds=unasked) == "deepspeed"
    assert choose("torch", {}, native_builds=unasked) == "torch"  # asked for: taken


@pytest.mark.skipif(shutil.which(native.COMPILER) is None, reason="no C compiler here")
def test_auto_without_measurements_takes_native_here():
    """This machine has a C compiler, and the kernel passes its check against torch's."""
    assert kernels.native_available()
    assert choose("auto", {}) == "native"


def test_measure_reports_params_per_second():
    assert measure(TorchAdamW(), 100_000, 2) > 0
    assert measure(NativeAdamW(), 100_000, 2) > 0


def test_without_deepspeed_the_kernel_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.ops.op_builder", None)  # import fails as if absent
    with pytest.raises(
        ConfigError, match=r"optim.kernel=deepspeed: DeepSpeed is not installed.*optim.kernel=torch"
    ):
        load_deepspeed_cpu_adam()


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native kernel built into an empty cache, and loaded anew in this process (and after)."""
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    kernels._native.cache_clear()
    yield tmp_path
    kernels._native.cache_clear()


def test_without_a_compiler_the_native_kernel_says_what_to_do(monkeypatch, fresh_native):
    monkeypatch.setattr(native, "COMPILER", "no-such-cc")
    with pytest.raises(ConfigError, match=r"optim.kernel=native: no C compiler .*optim.kernel=torch"):
        make_kernel("native")
    assert not kernels.native_available()
    assert choose("auto", {}, native_builds=kernels.native_available) == "torch"


def test_a_compile_error_names_the_compilers_message(monkeypatch, fresh_native):
    monkeypatch.setattr(native, "SOURCE", native.SOURCE + "\nthis is not C;\n")
    with pytest.raises(
        ConfigError, match=r"`cc` failed \(.*error.*\); install a C compiler.*optim.kernel=torch"
    ):
        kernels.load_native()
    assert list(fresh_native.iterdir()) == []  # no library, no temporary files left behind


def test_the_native_kernel_is_built_once_and_checked(fresh_native):
    kernels.load_native()
    (built,) = fresh_native.iterdir()
    assert built == native.library_path() and built.suffix == ".so"
    mtime = built.stat().st_mtime_ns
    kernels._native.cache_clear()
    kernels.load_native()
    assert built.stat().st_mtime_ns == mtime  # the cached library, not a new build


def test_a_kernel_that_is_not_torchs_bit_for_bit_fails_the_check():
    """What load_native runs before it hands out the library: here against a kernel one bit off."""

    class OneBitOff(NativeAdamW):
        def __call__(self, params, grads, exp_avgs, exp_avg_sqs, steps, **hyper):
            super().__call__(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)
            if steps[0] == 2:  # the check's last update
                _bits(params[0])[-1] ^= 1

    assert kernels._differs_from_torch(_compiled()) == ""
    problem = kernels._differs_from_torch(OneBitOff(native.load()))
    assert problem.startswith("optim.kernel=native: the native AdamW kernel does not reproduce")
    assert "weights differ in 1 of 3001 elements" in problem and "set optim.kernel=torch" in problem


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
