"""The offload engine against a plain PyTorch loop: state in other tiers must not change the training.

Each case trains the same seeded model on the same data with gradient accumulation, clipping (really
active) and weight decay, once with tiertune placing state as the case says and once with
tests/reference.py, and compares every step's loss and every final weight.
"""

import json
import math
import threading
import time

import pytest
import torch
from conftest import fast_config
from reference import reference_run
from safetensors.torch import load_file

from tiertune.launch import engine
from tiertune.launch.loop import run
from tiertune.launch.models import build_model
from tiertune.offload import io as offload_io
from tiertune.offload import planner, streaming
from tiertune.offload.store import StoreCorruption
from tiertune.optim import blockwise
from tiertune.optim.interleave import Side, UpdateProfile

# As in test_equivalence: fused AdamW (tiertune) vs. the for-loop one (reference) differ by float32
# rounding only. The placements themselves change nothing: see test_placement_changes_no_bit.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5
COMMON = [
    "train.max_steps=6",
    "train.grad_accum_steps=2",
    "train.checkpoint_every=6",
    "optim.weight_decay=0.1",
    "optim.max_grad_norm=0.5",
]
CASES = {
    # (a) the optimizer's state in host memory, updated block by block by the CPU
    "optimizer-host": ["offload.optimizer=host"],
    # (b) weights and optimizer state on NVMe: weights streamed through a 2-slot window (depth 0)
    "params-optimizer-nvme": ["offload.params=nvme", "offload.optimizer=nvme", "offload.prefetch_depth=0"],
    # (c) a host budget too small for the whole state: the planner moves weights and state to NVMe
    "host-budget-evicts": ["memory.host_budget_gib=0.065", "offload.prefetch_depth=1"],
    # (b) under activation checkpointing: the recomputed forward fetches the weights again
    "nvme-activation-checkpointing": [
        "offload.params=nvme",
        "offload.optimizer=nvme",
        "offload.prefetch_depth=1",
        "train.activation_checkpointing=true",
    ],
    # tied embeddings: the head computes with a weight the embedding block owns
    "tied-gpt2-nvme": ["model.preset=tiny-gpt2", "offload.params=nvme", "offload.optimizer=nvme"],
}


def _train(tmp_path, *overrides):
    cfg = fast_config(tmp_path, *COMMON, *overrides)
    summary = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    checkpoint = tmp_path / "checkpoints" / "step-00000006" / "trainable.safetensors"
    weights = load_file(str(checkpoint if checkpoint.exists() else tmp_path / "final" / "model.safetensors"))
    return summary, rows, weights


def _assert_matches_reference(tmp_path, rows, weights, *overrides):
    ref_losses, ref_weights = reference_run(fast_config(tmp_path / "reference", *COMMON, *overrides))
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert any(r["grad_norm"] > 0.5 for r in rows)  # clipping was really active
    assert weights.keys() == ref_weights.keys()
    for name, weight in ref_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_offloaded_training_matches_plain_pytorch(tmp_path, case):
    summary, rows, weights = _train(tmp_path, *CASES[case])
    on = summary.memory["peak_bytes"]
    if case != "optimizer-host":
        assert on.get("nvme", 0) > 0  # the state really went to the drive
    if case == "host-budget-evicts":
        nvme = summary.memory["bytes"]["nvme"]
        assert nvme.get("params", 0) > 0 and nvme.get("optimizer", 0) > 0
        assert on["device"] <= summary.memory["budget_bytes"]["device"]
    assert not (tmp_path / "nvme-store").exists()  # the store's files go with the run
    _assert_matches_reference(tmp_path, rows, weights, *CASES[case])


def test_a_model_of_tens_of_millions_of_parameters_streams_from_nvme_exactly(tmp_path):
    overrides = ["model.preset=small-llama", "offload.params=nvme", "offload.optimizer=nvme"]
    summary, rows, weights = _train(tmp_path, *overrides)
    assert summary.total_params > 20_000_000
    _assert_matches_reference(tmp_path, rows, weights, *overrides)


@pytest.mark.parametrize("micro_steps", [1, 2, 4])
def test_accumulation_over_offloaded_gradients_loses_no_micro_step(tmp_path, micro_steps):
    """Gradients summed in fp32 outside autograd, weights and state on NVMe, updates deferred into the
    next forward: 1, 2 and 4 micro-steps per step against plain PyTorch with the same accumulation."""
    overrides = [f"train.grad_accum_steps={micro_steps}", "offload.params=nvme", "offload.optimizer=nvme"]
    _, rows, weights = _train(tmp_path, *overrides)
    _assert_matches_reference(tmp_path, rows, weights, *overrides)


def test_placement_changes_no_bit(tmp_path):
    """The same job resident and fully streamed: the update arithmetic is the same kernel on the same
    numbers, so the losses and weights are identical, not merely close."""
    _, resident_rows, resident = _train(tmp_path / "resident", "offload.optimizer=device")
    _, rows, streamed = _train(tmp_path / "streamed", "offload.params=nvme", "offload.optimizer=nvme")
    assert [r["loss"] for r in rows] == [r["loss"] for r in resident_rows]
    assert all(torch.equal(streamed[n], resident[n]) for n in resident)


def test_deepspeeds_cpu_adam_trains_like_plain_pytorch(tmp_path):
    """optim.kernel=deepspeed: its CPU Adam (compiled on first use) on NVMe-homed state. It rounds
    differently from torch's kernel in the last bits, well inside the stated tolerance."""
    overrides = ["offload.params=nvme", "offload.optimizer=nvme", "optim.kernel=deepspeed"]
    _, rows, weights = _train(tmp_path, *overrides)
    _assert_matches_reference(tmp_path, rows, weights, *overrides)


def _optimizer_file(run_dir, step=6):
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / "optimizer.pt", weights_only=True)


def test_offloaded_optimizer_state_is_saved_as_torch_saves_it(tmp_path):
    """State streamed from NVMe into optimizer.pt: the same file as the resident run's torch AdamW writes,
    and a plain AdamW over the model's parameters (grouped as tests/reference.py groups them) loads it."""
    _train(tmp_path / "resident", "offload.optimizer=device")
    _train(tmp_path / "streamed", "offload.params=nvme", "offload.optimizer=nvme")
    resident, streamed = _optimizer_file(tmp_path / "resident"), _optimizer_file(tmp_path / "streamed")
    assert streamed["param_groups"] == resident["param_groups"]
    assert streamed["state"].keys() == resident["state"].keys() and len(streamed["state"]) > 0
    for i, entry in resident["state"].items():
        assert entry.keys() == streamed["state"][i].keys()
        assert all(torch.equal(streamed["state"][i][k], t) for k, t in entry.items())

    cfg = fast_config(tmp_path / "plain", *COMMON)
    model = build_model(cfg.model, seed=cfg.train.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    plain = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    )
    plain.load_state_dict(streamed)
    for i, p in enumerate([*decay, *no_decay]):
        assert torch.equal(plain.state[p]["exp_avg_sq"], resident["state"][i]["exp_avg_sq"])


class _Stop(Exception):
    pass


def _stop_after(step):
    def callback(row):
        if row["step"] == step:
            raise _Stop

    return callback


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (["offload.optimizer=device"], ["offload.params=nvme", "offload.optimizer=nvme"]),
        (["offload.params=nvme", "offload.optimizer=nvme"], ["offload.optimizer=device"]),
        (["train.dtype=bf16"], ["train.dtype=bf16", "offload.params=nvme", "offload.optimizer=nvme"]),
        (["train.dtype=bf16", "offload.params=nvme", "offload.optimizer=nvme"], ["train.dtype=bf16"]),
    ],
    ids=["resident-then-nvme", "nvme-then-resident", "bf16-resident-then-nvme", "bf16-nvme-then-resident"],
)
def test_a_run_resumes_exactly_with_another_placement(tmp_path, first, then):
    """One optimizer.pt layout for every placement: stopped after step 3 and resumed with the state in
    another tier, the run ends with the same weights, bit for bit, as the run that never stopped."""
    _, whole_rows, whole = _train(tmp_path / "whole", *first)
    job = [*COMMON, "train.checkpoint_every=3"]
    with pytest.raises(_Stop):
        run(fast_config(tmp_path / "cut", *job, *first), callbacks=[_stop_after(4)])
    summary = run(fast_config(tmp_path / "cut", *job, *then))
    assert summary.resumed_from_step == 3
    weights = load_file(str(tmp_path / "cut" / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    assert all(torch.equal(weights[n], whole[n]) for n in whole)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows][-3:] == [r["loss"] for r in whole_rows][-3:]


def test_lora_over_a_streamed_base_changes_no_bit(tmp_path):
    """LoRA with its frozen base and its adapters' state on NVMe against the same LoRA job resident."""
    _, resident_rows, resident = _train(tmp_path / "resident", "tuning.method=lora")
    _, rows, streamed = _train(
        tmp_path / "streamed", "tuning.method=lora", "offload.params=nvme", "offload.optimizer=nvme"
    )
    assert [r["loss"] for r in rows] == [r["loss"] for r in resident_rows]
    assert streamed.keys() == resident.keys() and all("lora_" in n for n in resident)
    assert all(torch.equal(streamed[n], resident[n]) for n in resident)


# bf16 weights with fp32 masters: the same kernels on the same numbers as plain PyTorch's mixed precision
# (tests/reference.py, with fused AdamW), so every loss, master and weight is equal, bit for bit.
BF16_CASES = {
    "resident": [],
    "optimizer-host": ["offload.optimizer=host"],
    # weights and [moments | masters] on NVMe; updates during backward, validated (clipping is active)
    "nvme-backward": ["offload.params=nvme", "offload.optimizer=nvme", "optim.overlap=backward"],
    # no clipping: the updates made during backward stand (with clipping they are undone and redone)
    "nvme-backward-unclipped": ["offload.params=nvme", "offload.optimizer=nvme", "optim.max_grad_norm=0"],
    "nvme-forward": ["offload.params=nvme", "offload.optimizer=nvme", "optim.overlap=forward"],
    "nvme-none-small-chunks": ["offload.params=nvme", "offload.optimizer=nvme", "optim.overlap=none"],
    # tied embedding and LM head (GPT-2): the head's gradient is kept aside and summed into the
    # embedding's as autograd sums them (tiertune.optim.tied); in backward, validated, and deferred
    "tied-nvme-backward": [
        "model.preset=tiny-gpt2",
        "offload.params=nvme",
        "offload.optimizer=nvme",
        "optim.overlap=backward",
    ],
    "tied-nvme-backward-unclipped": [
        "model.preset=tiny-gpt2",
        "offload.params=nvme",
        "offload.optimizer=nvme",
        "optim.max_grad_norm=0",
    ],
    "tied-optimizer-host": ["model.preset=tiny-gpt2", "offload.optimizer=host"],
}


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_weights_with_fp32_masters_train_exactly_like_plain_pytorch(tmp_path, monkeypatch, case):
    if case.endswith("small-chunks"):  # several chunks a block: each holds its range of all three parts
        monkeypatch.setattr(planner, "OPTIMIZER_CHUNK_BYTES", 3 * 64 * 1024)
    summary, rows, masters = _train(tmp_path, "train.dtype=bf16", *BF16_CASES[case])
    if case.startswith("nvme"):
        assert summary.memory["peak_bytes"].get("nvme", 0) > 0
    clip = [o for o in BF16_CASES[case] if o.startswith("optim.max_grad_norm")]
    same = [o for o in BF16_CASES[case] if o.startswith(("optim.max_grad_norm", "model."))]
    ref_losses, ref_masters = reference_run(fast_config(tmp_path / "ref", *COMMON, "train.dtype=bf16", *same))
    assert [r["loss"] for r in rows] == ref_losses
    if case == "nvme-backward":  # clipping: the first step's updates made in backward were undone
        assert sum(r["updates_undone"] for r in rows) > 0
    if clip:
        assert sum(r["updates_in_backward"] for r in rows) > 0
    else:
        assert any(r["grad_norm"] > 0.5 for r in rows)  # clipping was really active
    assert masters.keys() == ref_masters.keys()
    assert all(masters[n].dtype == torch.float32 and torch.equal(masters[n], ref_masters[n]) for n in masters)
    model = load_file(str(tmp_path / "final" / "model.safetensors"))  # the weights: the masters, rounded
    assert all(model[n].dtype == torch.bfloat16 for n in model)
    assert all(torch.equal(model[n], ref_masters[n].to(torch.bfloat16)) for n in ref_masters)


def test_bf16_halves_the_weights_and_keeps_fp32_masters_with_the_optimizer_state(tmp_path):
    summary, _, _ = _train(tmp_path, "train.dtype=bf16", "offload.params=nvme", "offload.optimizer=host")
    n = build_model(fast_config(tmp_path / "x").model, seed=0).num_parameters()
    peak = summary.memory["peak_bytes"]
    assert n * 2 <= peak["nvme"] < n * 2 * 1.05  # bf16 weights, 4 KiB-aligned per flat
    assert n * 12 <= peak["device"]  # two moments and a master, fp32 (and the grads)


# bf16 autocast over fp32 weights: the streamed and the resident run compute the same bf16 kernels on
# the same fp32 weights, so they agree far inside the stated tolerance (observed: identical).
BF16_LOSS_RTOL, BF16_WEIGHT_ATOL = 1e-3, 1e-4


def test_bf16_autocast_streamed_matches_bf16_autocast_resident(tmp_path):
    _, ref_rows, ref = _train(tmp_path / "resident", "train.dtype=bf16-autocast")
    _, rows, streamed = _train(
        tmp_path / "streamed", "train.dtype=bf16-autocast", "offload.params=nvme", "offload.optimizer=nvme"
    )
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=BF16_LOSS_RTOL)
    for name, weight in ref.items():
        torch.testing.assert_close(streamed[name], weight, rtol=0, atol=BF16_WEIGHT_ATOL, msg=name)


# -- races: reads made slow on purpose, so that computing before a fetch is waited for would be caught --


def _slow_reads(monkeypatch, delay_s: float) -> dict:
    """Every NVMe read piece sleeps first: a block is still in flight when the compute wants it."""
    delayed = {"n": 0}
    lock = threading.Lock()
    pread = offload_io._pread

    def late(piece, view):
        time.sleep(delay_s)
        with lock:
            delayed["n"] += 1
        return pread(piece, view)

    monkeypatch.setattr(offload_io, "_pread", late)
    return delayed


@pytest.fixture
def slow_reads(monkeypatch):
    return _slow_reads(monkeypatch, 0.002)


RACE = ["offload.params=nvme", "offload.optimizer=nvme", "offload.prefetch_depth=2"]


def test_slow_fetches_are_waited_for(tmp_path, slow_reads, monkeypatch):
    waits = []
    close = streaming.BlockStreamer.close

    def record(self, gather=True, frozen=True):
        waits.append(self.waits)
        close(self, gather, frozen)

    monkeypatch.setattr(streaming.BlockStreamer, "close", record)
    _, rows, weights = _train(tmp_path, *RACE)
    assert slow_reads["n"] > 0 and waits and waits[0] > 0  # computing really caught fetches in flight
    _assert_matches_reference(tmp_path, rows, weights, *RACE)


def test_the_race_test_catches_a_missing_wait(tmp_path, monkeypatch):
    """The control: with the wait taken out, the slow reads land after the compute used the slot. Reads
    are slower here than in the test it controls (prefetch hides 2 ms a piece well enough that a missing
    wait is not caught every time); the test above still sees the compute wait for blocks in flight."""
    _slow_reads(monkeypatch, 0.03)

    def no_wait(self, f):
        f.pending = None  # forget the read in flight instead of waiting for it
        self._point(f, f.slot.view(f.dtype)[: f.numel])

    monkeypatch.setattr(streaming.BlockStreamer, "_finish_fetch", no_wait)
    try:
        _, rows, _ = _train(tmp_path, *RACE)
    except Exception:  # noqa: BLE001 (a torn state may also fail loudly: that is caught too)
        return
    ref_losses, _ = reference_run(fast_config(tmp_path / "reference", *COMMON, *RACE))
    assert [r["loss"] for r in rows] != pytest.approx(ref_losses, rel=LOSS_RTOL)


@pytest.fixture
def slow_writes(monkeypatch):
    """Every NVMe write piece sleeps first: state written back is still on its way when the next step's
    chunks are read ahead."""
    delayed = {"n": 0}
    lock = threading.Lock()
    pwrite = offload_io._pwrite

    def late(piece, view):
        time.sleep(0.02)
        with lock:
            delayed["n"] += 1
        return pwrite(piece, view)

    monkeypatch.setattr(offload_io, "_pwrite", late)
    return delayed


# The optimizer state only on NVMe, in fewer chunks than staging slots: the read-ahead comes round to the
# chunks the step has just written. No checkpoint before the end: every update runs inside the forward.
WRITE_RACE = ["offload.optimizer=nvme", "train.checkpoint_every=0"]


@pytest.fixture
def many_slots(monkeypatch):
    monkeypatch.setattr(planner, "OPTIMIZER_SLOTS", 12)


def test_state_is_not_read_back_before_its_write_lands(tmp_path, slow_writes, many_slots, monkeypatch):
    held_back = {"n": 0}
    writing = blockwise.BlockAdamW._writing

    def counted(self, unit):
        busy = writing(self, unit)
        held_back["n"] += busy
        return busy

    monkeypatch.setattr(blockwise.BlockAdamW, "_writing", counted)
    _, rows, weights = _train(tmp_path, *WRITE_RACE)
    assert slow_writes["n"] > 0 and held_back["n"] > 0  # reads really waited for writes in flight
    _assert_matches_reference(tmp_path, rows, weights, *WRITE_RACE)


def test_the_write_race_test_catches_a_missing_wait(tmp_path, slow_writes, many_slots, monkeypatch):
    """The control: reading a chunk ahead while its write is in flight gives stale or torn state."""
    monkeypatch.setattr(blockwise.BlockAdamW, "_writing", lambda self, unit: False)
    try:
        _, rows, _ = _train(tmp_path, *WRITE_RACE)
    except StoreCorruption:  # a torn chunk fails its checksum: caught too
        return
    ref_losses, _ = reference_run(fast_config(tmp_path / "reference", *COMMON, *WRITE_RACE))
    assert [r["loss"] for r in rows] != pytest.approx(ref_losses, rel=LOSS_RTOL)


# -- an accelerator's path on the CPU: NVMe-homed weights reach the window through host buffers, and the
# update runs on a host copy read from the drive (CUDA adds streams and events to the same sequence) --


@pytest.fixture
def staged(monkeypatch):
    monkeypatch.setattr(streaming, "STAGE_ON_CPU", True)
    calls = {"_land": 0, "put_home": 0}
    for name in calls:
        original = getattr(streaming.BlockStreamer, name)

        def counted(self, f, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, f)

        monkeypatch.setattr(streaming.BlockStreamer, name, counted)
    return calls


STAGED = ["offload.params=nvme", "offload.optimizer=nvme", "offload.prefetch_depth=1"]


def test_nvme_weights_staged_through_host_buffers_match_plain_pytorch(tmp_path, staged, slow_reads):
    _, rows, weights = _train(tmp_path, *STAGED)
    assert staged["_land"] > 0 and staged["put_home"] > 0 and slow_reads["n"] > 0
    _assert_matches_reference(tmp_path, rows, weights, *STAGED)


@pytest.mark.cuda
def test_on_cuda_weights_streamed_from_host_train_like_resident_weights(tmp_path):
    """Side-stream copies, events and the saved-tensor rebuilding on a real device (skipped without one).
    GPU kernels are not bit-deterministic run to run: a tolerance of 1e-4."""
    device = ["train.device=cuda"]
    _, ref_rows, ref = _train(tmp_path / "resident", *device)
    _, rows, streamed = _train(
        tmp_path / "streamed", *device, "offload.params=host", "offload.optimizer=host", "offload.grads=host"
    )
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-4)
    for name, weight in ref.items():
        torch.testing.assert_close(streamed[name], weight, rtol=0, atol=1e-4, msg=name)


@pytest.mark.cuda
def test_on_cuda_weights_streamed_from_nvme_train_like_resident_weights(tmp_path):
    """The staged path with real pinned buffers, side-stream copies and events (skipped without a GPU)."""
    device = ["train.device=cuda"]
    _, ref_rows, ref = _train(tmp_path / "resident", *device)
    _, rows, streamed = _train(tmp_path / "streamed", *device, *STAGED, "offload.grads=host")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-4)
    for name, weight in ref.items():
        torch.testing.assert_close(streamed[name], weight, rtol=0, atol=1e-4, msg=name)


def test_training_through_deepspeeds_async_io_matches_plain_pytorch(tmp_path):
    from tiertune.offload.io import IOBackendUnavailable, load_deepspeed_aio

    try:
        load_deepspeed_aio()
    except IOBackendUnavailable as e:
        pytest.skip(str(e))
    overrides = ["offload.params=nvme", "offload.optimizer=nvme", "offload.io_backend=deepspeed"]
    _, rows, weights = _train(tmp_path, *overrides)
    _assert_matches_reference(tmp_path, rows, weights, *overrides)


# -- updates overlapped with backward -------------------------------------------------------------------
# With optim.overlap=backward a block is updated as soon as its gradients are complete in the step's last
# backward, as if the step will neither clip nor skip; the step then validates. Against overlap=none (every
# update after backward, the ordinary step) the runs must agree bit for bit: the same kernel on the same
# numbers, whether the speculation was kept or undone and redone.

OVERLAP_PLACEMENTS = {
    "host": ["offload.optimizer=host"],
    "nvme": ["offload.params=nvme", "offload.optimizer=nvme"],
}


def _updaters(monkeypatch):
    made = []
    init = blockwise.BlockAdamW.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(blockwise.BlockAdamW, "__init__", recording)
    return made


def _assert_identical(a, b):
    (_, rows_a, weights_a), (_, rows_b, weights_b) = a, b
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["grad_norm"] for r in rows_a] == [r["grad_norm"] for r in rows_b]
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)


@pytest.mark.parametrize("placement", OVERLAP_PLACEMENTS)
@pytest.mark.parametrize("clipping", ["clipping", "no-clipping"])
@pytest.mark.parametrize("undo", ["every-block", "default-share"])
def test_updates_during_backward_equal_the_ordinary_step(tmp_path, monkeypatch, placement, clipping, undo):
    """``undo``: room to undo every block, or the default share, where the blocks that complete first are
    updated in backward and the others wait for their next forward, in one step."""
    made = _updaters(monkeypatch)
    if undo == "every-block":
        monkeypatch.setattr(engine, "UNDO_SHARE", 1.0)
    job = [
        *OVERLAP_PLACEMENTS[placement],
        "optim.max_grad_norm=" + ("0.5" if clipping == "clipping" else "0"),
    ]
    overlapped = _train(tmp_path / "backward", *job, "optim.overlap=backward")
    ordinary = _train(tmp_path / "none", *job, "optim.overlap=none")
    _assert_identical(overlapped, ordinary)
    spec = made[0]
    assert spec.overlap == "backward" and spec.speculated_blocks > 0
    every = 6 * len(spec.states)  # blocks, steps
    if clipping == "clipping":
        assert any(r["grad_norm"] > 0.5 for r in overlapped[1])
        assert spec.rollbacks > 0  # the first step clipped: its speculative updates were undone and redone
    elif undo == "every-block":
        assert spec.rollbacks == 0 and spec.speculated_blocks == every
    else:
        assert spec.rollbacks == 0 and 6 <= spec.speculated_blocks < every
    rows = overlapped[1]  # the metrics rows say the same, step by step
    assert sum(r["updates_in_backward"] + r["updates_undone"] for r in rows) == spec.speculated_blocks
    assert sum(r["updates_undone"] for r in rows) == spec.rollbacks


def test_updates_during_backward_match_plain_pytorch_with_clipping(tmp_path):
    overrides = ["offload.params=nvme", "offload.optimizer=nvme", "optim.overlap=backward"]
    _, rows, weights = _train(tmp_path, *overrides)
    _assert_matches_reference(tmp_path, rows, weights, *overrides)


def _poison(monkeypatch, step):
    """From the first parameter of the embedding block (the last block backward completes, so every other
    block has been updated speculatively by then), an inf gradient in optimizer step ``step``."""
    hook_of, step_of = blockwise.BlockAdamW._grad_hook, blockwise.BlockAdamW.step
    done = [0]

    def counting(self, lr):
        done[0] += 1
        return step_of(self, lr)

    def grad_hook(self, s, i):
        hook = hook_of(self, s, i)
        if s.flat.flat.block != "embed" or i != 0:
            return hook

        def poisoned(p):
            if done[0] == step - 1:
                p.grad.view(-1)[0] = float("inf")
            hook(p)

        return poisoned

    monkeypatch.setattr(blockwise.BlockAdamW, "step", counting)
    monkeypatch.setattr(blockwise.BlockAdamW, "_grad_hook", grad_hook)
    return done


@pytest.mark.parametrize("placement", OVERLAP_PLACEMENTS)
def test_an_inf_gradient_undoes_the_updates_made_during_backward(tmp_path, monkeypatch, placement):
    """Step 3's gradient is inf: the blocks updated during its backward are put back, the step is skipped,
    and training goes on exactly as with the ordinary step."""
    made = _updaters(monkeypatch)
    monkeypatch.setattr(engine, "UNDO_SHARE", 1.0)  # every block but the poisoned one is updated in backward
    done = _poison(monkeypatch, 3)
    job = [*OVERLAP_PLACEMENTS[placement], "optim.max_grad_norm=0"]
    overlapped = _train(tmp_path / "backward", *job, "optim.overlap=backward")
    done[0] = 0
    ordinary = _train(tmp_path / "none", *job, "optim.overlap=none")
    _assert_identical(overlapped, ordinary)
    rows = overlapped[1]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False, False]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(w).all() for w in overlapped[2].values())
    assert made[0].rollbacks == len(made[0].states) - 1  # every block but the poisoned one


@pytest.mark.parametrize(
    ("overlap", "dtype"), [("none", "fp32"), ("forward", "fp32"), ("backward", "fp32"), ("forward", "bf16")]
)
def test_updates_split_between_the_cpu_and_the_device_equal_the_cpu_alone(
    tmp_path, monkeypatch, overlap, dtype
):
    """Interleaved updates, the device side run on the CPU (scratch slots, copies there and back, the same
    kernel): a slow device with a fast link gets about a third of the blocks, and the run is the CPU-only
    run bit for bit (bf16: the masters go over and come back, and the weights come back rounded from them).
    On CUDA the device's kernel rounds differently: see the cuda test."""
    made = _updaters(monkeypatch)
    monkeypatch.setattr(blockwise, "UPDATE_ON_CPU", True)
    slow_device = UpdateProfile(cpu_rate=2e9, gpu_rate=1e9, h2d=5e10, d2h=5e10)
    monkeypatch.setattr(engine, "_update_profile", lambda cfg: slow_device)
    job = ["offload.optimizer=host", f"optim.overlap={overlap}", f"train.dtype={dtype}"]
    split = _train(tmp_path / "split", *job)
    monkeypatch.setattr(blockwise, "UPDATE_ON_CPU", False)
    alone = _train(tmp_path / "cpu", *job)
    _assert_identical(split, alone)
    updater = made[0]
    assert updater.interleave is not None and made[1].interleave is None
    assert 0 < updater.device_updates < 6 * len(updater.states)
    assert updater.interleave.rates[Side.GPU] != slow_device.gpu_rate  # refined from measured blocks


@pytest.mark.cuda
def test_on_cuda_updates_split_between_the_cpu_and_the_gpu_train_like_the_cpu_alone(tmp_path, monkeypatch):
    """Interleaved updates on a real device (skipped without one): pinned state, the update stream, events.
    The GPU's AdamW kernel rounds differently from the CPU's: a tolerance of 1e-4."""
    made = _updaters(monkeypatch)
    fast_link = UpdateProfile(cpu_rate=1e9, gpu_rate=1e10, h2d=2.5e10, d2h=2.5e10)
    monkeypatch.setattr(engine, "_update_profile", lambda cfg: fast_link)
    job = ["train.device=cuda", "offload.optimizer=host", "offload.grads=host", "optim.overlap=forward"]
    _, rows, split = _train(tmp_path / "split", *job)
    _, ref_rows, alone = _train(tmp_path / "cpu", *job, "optim.interleave=false")
    assert made[0].device_updates > 0 and made[1].interleave is None
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-4)
    for name, weight in alone.items():
        torch.testing.assert_close(split[name], weight, rtol=0, atol=1e-4, msg=name)
