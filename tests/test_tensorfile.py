"""Files written tensor by tensor read back with the libraries' own readers, and hold no tensor longer
than it takes to write it."""

import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file

from tiertune.offload.tensorfile import Deferred, write_safetensors, write_torch


def _tensors(count: int, alive: list):
    """Views into one buffer (as the block optimizer hands out its moments), each checked dead before
    the next is made: ``alive`` counts how many earlier ones were still referenced."""
    base = torch.arange(count * 6, dtype=torch.float32)
    refs = []
    for i in range(count):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        t = base[i * 6 : (i + 1) * 6].view(2, 3).clone() if i % 2 else base[i * 6 : (i + 1) * 6].view(2, 3)
        refs.append(weakref.ref(t))
        yield t
        del t


def test_write_torch_reads_back_with_torch_load_views_included(tmp_path):
    obj = {
        "state": {i: {"x": Deferred(i, (2, 3), torch.float32)} for i in range(4)},
        "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}],
    }
    alive: list[int] = []
    write_torch(tmp_path / "a.pt", obj, _tensors(4, alive))
    expected = torch.arange(24, dtype=torch.float32).view(4, 2, 3)
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "a.pt", weights_only=True, mmap=mmap)
        assert loaded["param_groups"] == obj["param_groups"]
        assert all(torch.equal(loaded["state"][i]["x"], expected[i]) for i in range(4))
    assert alive[1:] == [0, 0, 0]  # the clones were freed once written (views share their base)


def test_write_torch_refuses_a_tensor_unlike_its_placeholder(tmp_path):
    obj = {"a": Deferred(0, (2,), torch.float32)}
    with pytest.raises(ValueError, match="expected"):
        write_torch(tmp_path / "a.pt", obj, iter([torch.zeros(3)]))
    with pytest.raises(ValueError, match="1 placeholders"):
        write_torch(tmp_path / "b.pt", obj, iter([]))


def test_write_safetensors_takes_views(tmp_path):
    base = torch.arange(12.0)
    entries = [("a", torch.float32, (2, 3)), ("b", torch.float32, (6,))]
    write_safetensors(
        tmp_path / "x.safetensors", entries, iter([("a", base[:6].view(2, 3)), ("b", base[6:])])
    )
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(loaded["a"].reshape(-1), base[:6]) and torch.equal(loaded["b"], base[6:])
