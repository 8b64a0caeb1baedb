"""A trained weight that two modules share (GPT-2's tied embedding and LM head): a gradient per use, summed
as autograd sums them, without the weight-sized tensors autograd holds for the sum (tiertune.optim.tied).
The bf16 runs against plain PyTorch, bit for bit, are in test_offload_equivalence.py."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import fast_config
from test_streaming import BATCH, _engine
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tiertune.launch.loop import run
from tiertune.optim import blockwise

TIED = ["model.preset=tiny-gpt2", "offload.params=nvme", "offload.optimizer=nvme"]


class _WeightSized(TorchDispatchMode):
    """Counts the tensors of ``shape`` that ops make (new memory, not views of their inputs) while they
    live, and the most alive at once."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.live, self.peak = tuple(shape), 0, 0

    def _gone(self) -> None:
        self.live -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            if new and tuple(t.shape) == self.shape:
                self.live += 1
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._gone)
        return out


def _backward_peaks(tmp_path, micro_steps: int, *overrides: str) -> list[int]:
    """The most embedding-sized tensors alive at once in each of ``micro_steps`` backwards of one step."""
    engine = _engine(tmp_path, *TIED, *overrides)
    try:
        shape = engine.model.transformer.wte.weight.shape
        peaks = []
        for _ in range(micro_steps):
            with _WeightSized(shape) as count:
                engine.forward_backward(BATCH, 62)
            peaks.append(count.peak)
        engine.step(1e-3)
        return peaks
    finally:
        engine.close(gather=False)


def test_the_head_and_embedding_gradients_are_never_summed_into_a_third_tensor(tmp_path, monkeypatch):
    """Autograd alone holds the head's gradient, then the embedding's, then their sum: three at once. With
    a gradient per use, the head's goes into the (empty) gradient home at once: one at a time; on a later
    micro-batch (the home holds the step's sum so far) it waits for the embedding's and is added into it
    in place: two."""
    assert _backward_peaks(tmp_path / "per-use", 2) == [1, 2]
    monkeypatch.setattr(blockwise, "later_uses", lambda model, params: {})  # autograd sums the uses
    assert _backward_peaks(tmp_path / "autograd", 2) == [3, 3]


def _weights(tmp_path, *overrides):
    cfg = fast_config(tmp_path, *TIED, "train.max_steps=4", "optim.max_grad_norm=0.5", *overrides)
    run(cfg)
    from safetensors.torch import load_file

    return load_file(str(tmp_path / "final" / "model.safetensors"))


@pytest.mark.parametrize("micro_steps", [1, 3])
def test_a_gradient_per_use_changes_no_bit_of_fp32_training(tmp_path, monkeypatch, micro_steps):
    """fp32: the head's gradient straight into the home, or kept and added into the embedding's, gives the
    same weights, bit for bit, as autograd summing the two uses itself."""
    accum = f"train.grad_accum_steps={micro_steps}"
    per_use = _weights(tmp_path / "per-use", accum)
    monkeypatch.setattr(blockwise, "later_uses", lambda model, params: {})
    summed = _weights(tmp_path / "autograd", accum)
    assert per_use.keys() == summed.keys()
    assert all(torch.equal(per_use[n], summed[n]) for n in summed)


def test_a_later_uses_gradient_arrives_when_the_first_use_is_not_called(tmp_path):
    """The head alone in the graph (the embedding not called): its gradient is all the weight gets, and it
    lands in the home as autograd's would: straight away into an empty home, at the end of backward into
    one that holds the step's first micro-batch."""
    engine = _engine(tmp_path, *TIED, "train.grad_accum_steps=2")
    try:
        name = "transformer.wte.weight"
        weight = engine.trainable_tensors()[name].clone()
        s = next(s for s in engine.updater.states if name in s.flat.flat.names)
        i = s.flat.flat.names.index(name)
        offset = s.flat.flat.offsets[i]
        g = torch.Generator().manual_seed(0)
        hiddens = [torch.randn(2, 8, weight.shape[1], generator=g) for _ in range(2)]
        engine.streamer.backward = True
        for hidden in hiddens:
            with engine.streamer.saved_tensors():
                loss = engine.model.lm_head(hidden).square().mean()
            loss.backward()  # the weight's own accumulate step runs (with no gradient): it takes the head's
            assert not s.later and s.touched[i]
        w = weight.requires_grad_()
        g1, g2 = (torch.autograd.grad(F.linear(h, w).square().mean(), w)[0] for h in hiddens)
        assert torch.equal(s.grad[offset : offset + w.numel()].view_as(w), g1 + g2)
    finally:
        engine.streamer.backward = False
        engine.close(gather=False)


def test_the_alias_lives_for_one_call_and_goes_with_the_engine(tmp_path):
    engine = _engine(tmp_path, *TIED)
    head = engine.model.lm_head
    try:
        engine.forward_backward(BATCH, 62)
        assert "weight" not in head.__dict__ and head.weight is engine.model.transformer.wte.weight
        with torch.no_grad():
            engine.model(input_ids=BATCH["input_ids"])
        assert "weight" not in head.__dict__
        engine.step(1e-3)
    finally:
        engine.close(gather=False)
    assert not head._forward_pre_hooks and not head._forward_hooks
