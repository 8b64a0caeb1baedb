import errno
import json

import pytest
from conftest import fast_config

from tiertune.errors import CheckpointError
from tiertune.launch import checkpoint as ckpt
from tiertune.launch.loop import run


def _trained(tmp_path, steps=4, every=2):
    run(fast_config(tmp_path, f"train.max_steps={steps}", f"train.checkpoint_every={every}"))
    return ckpt.list_checkpoints(tmp_path)


def test_checkpoints_are_complete_pruned_and_verified(tmp_path):
    found = _trained(tmp_path, steps=6, every=2)
    assert [c.step for c in found] == [4, 6]  # keep_checkpoints=2
    manifest = ckpt.verify_checkpoint(found[-1].path)
    assert set(manifest["files"]) == {"trainable.safetensors", "optimizer.pt", "loop_state.json", "rng.pt"}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "delete_manifest"])
def test_a_damaged_checkpoint_is_refused_never_loaded(tmp_path, damage):
    latest = _trained(tmp_path)[-1].path
    target = latest / "optimizer.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "delete_file":
        target.unlink()
    else:
        (latest / ckpt.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="is damaged and was not loaded") as info:
        run(fast_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    assert str(latest) in str(info.value)
    # Nothing that was saved is lost: the damaged and the earlier checkpoint are still there.
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 4]


def test_an_interrupted_save_leaves_the_previous_checkpoint_and_is_cleaned_up(tmp_path):
    _trained(tmp_path)
    leftover = tmp_path / "checkpoints" / ".tmp-step-00000006-999"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"half")
    summary = run(fast_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    assert summary.resumed_from_step == 4 and not leftover.exists()


def test_a_full_disk_is_reported_and_the_previous_checkpoint_kept(tmp_path):
    previous = ckpt.save_checkpoint(tmp_path, 1, lambda d: (d / "a.bin").write_bytes(b"x"), keep=2)

    def fill_disk(directory):
        (directory / "a.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="no space left.*step-00000001.*is intact"):
        ckpt.save_checkpoint(tmp_path, 2, fill_disk, keep=2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1]
    ckpt.verify_checkpoint(previous.path)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_manifest_lists_sizes_and_checksums(tmp_path):
    saved = ckpt.save_checkpoint(tmp_path, 3, lambda d: (d / "x.bin").write_bytes(b"abc"), keep=1)
    manifest = json.loads((saved.path / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 3
    assert manifest["files"]["x.bin"] == {
        "bytes": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
