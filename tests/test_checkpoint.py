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


def test_a_writer_that_fails_its_own_way_is_reported_too(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, lambda d: (d / "a.bin").write_bytes(b"x"), keep=2)

    def torch_save_on_a_full_disk(directory):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1110")

    with pytest.raises(CheckpointError, match="RuntimeError.*MiB free there.*step-00000001.*is intact"):
        ckpt.save_checkpoint(tmp_path, 2, torch_save_on_a_full_disk, keep=2)


@pytest.mark.slow
def test_a_job_that_cannot_write_its_checkpoint_stops_cleanly_and_keeps_the_last_one(tmp_path):
    """A real write failure: the job runs under a 16 MiB file-size limit, so torch.save of the 24 MiB
    optimizer state fails inside torch (as on a full disk) while everything smaller still writes."""
    import resource
    import signal
    import subprocess
    import sys

    from conftest import FAST, REPO

    run(fast_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an error from write(), not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiertune",
            "train",
            *FAST,
            f"output_dir={tmp_path}",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "offload.optimizer=auto",  # as the first run: no NVMe store (the default job has one)
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot write checkpoint step 4" in result.stderr and "step-00000002) is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2]
    ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step-00000002")
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
