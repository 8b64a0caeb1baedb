"""The block streamer and the block optimizer in failure and edge cases (equivalence is in
test_offload_equivalence.py)."""

import errno
import threading
import time

import pytest
import torch
from conftest import fast_config

from tiertune.launch.engine import StreamingEngine, build_engine
from tiertune.launch.loop import run
from tiertune.launch.models import WEIGHT_DTYPES, build_model, cast_parameters, skeleton
from tiertune.offload import io as offload_io
from tiertune.offload import streaming
from tiertune.offload.store import LOCK_NAME, StoreError

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": IDS, "labels": IDS}


def _engine(tmp_path, *overrides):
    """The engine as the loop builds it: a full model's blocks are made by the engine, in their homes."""
    from tiertune.tuning import get_method

    cfg = fast_config(tmp_path, *overrides)
    model = get_method(cfg.tuning.method).apply(skeleton(cfg.model), cfg.tuning)
    cast_parameters(model, WEIGHT_DTYPES[cfg.train.dtype])
    engine = build_engine(cfg, model, torch.device("cpu"), store_dir=tmp_path / "nvme-store")
    assert isinstance(engine, StreamingEngine)
    return engine


def _failing_writes(monkeypatch, after: int):
    """Every NVMe write piece after the first ``after`` fails with EIO."""
    pwrite, count, lock = offload_io._pwrite, {"n": 0}, threading.Lock()

    def failing(piece, view):
        with lock:
            count["n"] += 1
            n = count["n"]
        if n > after:
            raise OSError(errno.EIO, "Input/output error")
        return pwrite(piece, view)

    monkeypatch.setattr(offload_io, "_pwrite", failing)
    return count


def test_a_failed_optimizer_state_write_stops_the_step_with_a_clear_error(tmp_path, monkeypatch):
    engine = _engine(tmp_path, "offload.optimizer=nvme")
    try:
        engine.forward_backward(BATCH, 62)
        _failing_writes(monkeypatch, after=0)  # the very last chunk's write too: nothing is dropped
        engine.step(1e-3)  # the update itself runs when the blocks are next used, or here:
        with pytest.raises(StoreError, match="writing .* to the NVMe store failed: Input/output error"):
            engine.updater.flush()
    finally:
        engine.close(gather=False)


def test_a_step_updates_each_block_just_before_its_next_use(tmp_path):
    engine = _engine(tmp_path, "offload.optimizer=nvme", "offload.params=nvme")
    try:
        engine.forward_backward(BATCH, 62)
        before = engine.trainable_tensors()
        engine.step(1e-3)
        assert engine.updater.pending  # nothing changed yet: the step only clipped and marked the blocks
        embed = engine.streamer.flats[0]
        assert embed.trainable and torch.equal(
            engine.streamer.resident(embed)[:8], before[embed.flat.names[0]].reshape(-1)[:8]
        )
        updated_before_use = []
        engine.model.model.embed_tokens.register_forward_hook(
            lambda module, args, out: updated_before_use.append(not engine.updater.states[0].pending)
        )
        with torch.no_grad():
            engine.model(input_ids=IDS)  # the forward's pre-hooks run every pending update
        assert updated_before_use == [True]  # the embedding computed with its updated weights
        assert not engine.updater.pending
        after = engine.trainable_tensors()
        assert all(not torch.equal(after[n], before[n]) for n in before)
    finally:
        engine.close(gather=False)


def test_an_update_of_bf16_weights_writes_them_from_their_masters_without_reading_them(tmp_path):
    """Only one parameter of a layer gets a gradient: it changes, the layer's others keep their weights
    (their masters, rounded), and the update never reads the layer's weights from the drive (but the
    first, which takes the masters from them)."""
    engine = _engine(
        tmp_path, "train.dtype=bf16", "offload.params=nvme", "offload.optimizer=nvme", "optim.overlap=none"
    )
    s = engine.updater.states[1]  # the first decoder layer: several parameters
    p = s.flat.params[0]

    def step_only_the_first_parameter() -> None:
        p.grad = torch.full_like(p, 0.5)
        engine.updater._grad_hook(s, 0)(p)
        engine.step(1e-3)
        engine.settle()

    try:
        assert s.parts == 3 and s.flat.dtype == torch.bfloat16 and len(s.flat.params) > 2
        assert s.fresh  # no master written yet: the first update takes them from the weights
        step_only_the_first_parameter()
        assert not s.fresh
        before = engine.trainable_tensors()
        engine.streamer.refresh(s.flat)  # not in the window: an update that needed it would read it
        reads, read = [], engine.store.read
        engine.store.read = lambda extent, view: reads.append(extent) or read(extent, view)
        step_only_the_first_parameter()
        assert s.flat.extent not in reads  # the weights' home was written, never read
        engine.streamer.refresh(s.flat)  # what follows reads the drive's copy
        after, masters = engine.trainable_tensors(), engine.trainable_tensors(masters=True)
        first, *others = s.flat.flat.names
        assert not torch.equal(after[first], before[first])
        assert all(torch.equal(after[n], masters[n].to(torch.bfloat16)) for n in after)
        assert all(torch.equal(after[n], before[n]) for n in before if n != first)
    finally:
        engine.close(gather=False)


def test_a_block_used_without_its_pending_update_is_an_error_not_a_stale_gradient(tmp_path):
    engine = _engine(tmp_path, "offload.optimizer=host")
    try:
        engine.forward_backward(BATCH, 62)
        engine.step(1e-3)
        engine.streamer.before_use = None  # a forward that skips the update (a hook taken away)
        with pytest.raises(RuntimeError, match="before the block's pending update ran"):
            engine.forward_backward(BATCH, 62)
    finally:
        engine.close(gather=False)


def test_a_non_finite_gradient_leaves_nothing_pending(tmp_path):
    engine = _engine(tmp_path, "offload.optimizer=nvme")
    try:
        engine.forward_backward(BATCH, 62)
        engine.updater.states[0].grad[0] = float("inf")
        before = engine.trainable_tensors()
        assert engine.step(1e-3).skipped
        assert not engine.updater.pending
        engine.forward_backward(BATCH, 62)  # training goes on from the same weights
        assert all(torch.equal(t, before[n]) for n, t in engine.trainable_tensors().items())
    finally:
        engine.close(gather=False)


def test_an_update_that_failed_part_way_is_never_retried(tmp_path, monkeypatch):
    """A write error inside a deferred update leaves the block half stepped: the engine refuses to go on
    (a retry would step the chunks already done twice) and says to resume from a checkpoint."""
    engine = _engine(tmp_path, "offload.optimizer=nvme")
    closed = False
    try:
        for _ in range(2):
            engine.forward_backward(BATCH, 62)
            engine.step(1e-3)
        _failing_writes(monkeypatch, after=0)
        with pytest.raises(StoreError, match="Input/output error"):
            engine.forward_backward(BATCH, 62)  # the pending updates run, and fail, in this forward
        monkeypatch.undo()  # the drive works again: still no retry
        with pytest.raises(StoreError, match="failed part way .* resume from the last checkpoint"):
            engine.step(1e-3)
        with pytest.raises(StoreError, match="failed part way"):
            closed = True
            engine.close()  # gathering would need the update: refused, and everything released
        assert not (tmp_path / "nvme-store").exists()
    finally:
        if not closed:
            engine.close(gather=False)


def test_a_store_error_at_a_checkpoint_is_reported_as_a_store_error(tmp_path, monkeypatch):
    """The last step's updates run before the checkpoint is written, outside its error handling: a
    failing drive is not reported as a checkpoint directory that cannot be written."""
    settle = StreamingEngine.settle

    def settle_then_fail(self):
        _failing_writes(monkeypatch, after=0)
        settle(self)

    monkeypatch.setattr(StreamingEngine, "settle", settle_then_fail)
    cfg = fast_config(
        tmp_path,
        "offload.optimizer=nvme",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    )
    with pytest.raises(StoreError, match="writing .* to the NVMe store failed"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_write_failure_in_training_exits_cleanly_and_leaves_no_store_behind(tmp_path, monkeypatch):
    _failing_writes(monkeypatch, after=3)
    with pytest.raises(StoreError, match="the run stops here"):
        run(fast_config(tmp_path, "offload.optimizer=nvme", "offload.params=nvme", "train.max_steps=3"))
    assert not (tmp_path / "nvme-store").exists()


def test_close_releases_the_store_even_when_streamer_close_fails(tmp_path, monkeypatch):
    engine = _engine(tmp_path, "offload.optimizer=nvme", "offload.params=nvme")
    store_dir = tmp_path / "nvme-store"
    assert any(store_dir.glob("tiertune-store-*.bin"))

    def broken(self, gather=True, frozen=True):
        raise RuntimeError("boom")

    monkeypatch.setattr(streaming.BlockStreamer, "close", broken)
    with pytest.raises(RuntimeError, match="boom"):
        engine.close()
    assert not store_dir.exists()  # files and lock gone: another job may use the directory
    assert all(not h for h in (engine.updater._hooks,))
    engine.close()  # a second close does nothing


def test_hooks_are_removed_and_the_model_works_alone_after_close(tmp_path):
    engine = _engine(tmp_path, "offload.params=nvme", "offload.optimizer=nvme")
    engine.forward_backward(BATCH, 62)
    engine.step(1e-3)
    with torch.no_grad():
        before = engine.model(input_ids=IDS).logits
    engine.close()
    model = engine.model
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before)
    assert not (tmp_path / "nvme-store").exists()


def test_updating_a_block_waits_for_the_previous_write_of_its_slot(tmp_path, monkeypatch):
    """With every block in the window, a block's weights stay in their slot from one update to the next:
    the update must not change the slot while the last step's write of it is still running."""
    pwrite = offload_io._pwrite

    def slow(piece, view):
        time.sleep(0.02)
        return pwrite(piece, view)

    resident = streaming.BlockStreamer.resident

    def checked(self, f):
        out = resident(self, f)
        assert f.writing is None, f"{f.flat.block}: handed out for change while its write is in flight"
        return out

    engine = _engine(tmp_path, "offload.params=nvme", "offload.prefetch_depth=6")
    try:
        monkeypatch.setattr(offload_io, "_pwrite", slow)
        monkeypatch.setattr(streaming.BlockStreamer, "resident", checked)
        for _ in range(2):
            engine.forward_backward(BATCH, 62)
            engine.step(1e-3)
            engine.updater.flush()  # the updates run now rather than in the next forward
            assert any(f.writing is not None for f in engine.streamer.flats)  # writes still in flight
        engine.streamer.drain()
        weights = engine.trainable_tensors()
        for f in engine.streamer.flats:  # what the drive holds is what the model holds
            engine.streamer.refresh(f)
        assert all(torch.equal(weights[n], t) for n, t in engine.trainable_tensors().items())
    finally:
        engine.close(gather=False)


def test_lora_adapters_get_slots_of_their_own_size(tmp_path):
    engine = _engine(tmp_path, "tuning.method=lora", "offload.params=nvme", "offload.prefetch_depth=1")
    try:
        s = engine.streamer
        per_role = {}
        for f in s.flats:
            if f.streamed:
                per_role[f.role] = max(per_role.get(f.role, 0), f.nbytes)
        assert len(per_role) == 2  # the frozen base and the adapters of each layer
        assert sum(t.numel() for t in s.slots) == 3 * sum(per_role.values())  # depth 1 + 2 each
        assert per_role[1] < per_role[0] / 4  # the adapters' slots are small
    finally:
        engine.close(gather=False)


def test_a_step_where_no_weight_got_a_gradient_is_not_reported_as_skipped(tmp_path):
    engine = _engine(tmp_path, "offload.optimizer=nvme")
    try:
        report = engine.step(1e-3)
        assert report.grad_norm == 0.0 and not report.skipped
    finally:
        engine.close(gather=False)


def test_the_default_store_directory_is_locked_while_in_use(tmp_path):
    engine = _engine(tmp_path, "offload.optimizer=nvme")
    try:
        assert (tmp_path / "nvme-store" / LOCK_NAME).exists()
        with pytest.raises(StoreError, match="in use by another job"):
            _engine(tmp_path, "offload.optimizer=nvme")
        assert any((tmp_path / "nvme-store").glob("tiertune-store-*.bin"))  # the refused job left it be
        engine.forward_backward(BATCH, 62)
        engine.step(1e-3)
    finally:
        engine.close(gather=False)


def test_a_trace_shows_compute_and_nvme_traffic_on_their_own_tracks(tmp_path):
    import json

    run(fast_config(tmp_path, "train.trace=true", "train.max_steps=2", "offload.params=nvme"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"].split(" (")[0] for e in events if e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    on = {tracks[e["tid"]] for e in spans}
    assert {"compute", "nvme read", "nvme write"} <= on
    assert {"forward", "backward", "optimizer step"} <= {e["name"] for e in spans}
    assert all(e["dur"] >= 0 for e in spans)
    counters = [e for e in events if e["ph"] == "C"]
    assert counters and max(e["args"].get("nvme", 0) for e in counters) > 0
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sharded_model_directory_loads_block_by_block_into_its_tiers(tmp_path, monkeypatch):
    """From safetensors shards straight into the homes: each tensor is read on its own when its block is
    made, and the weights are exactly those of the directory."""
    from safetensors import safe_open as real_safe_open
    from transformers import AutoModelForCausalLM

    from tiertune.launch import models

    src = build_model(fast_config(tmp_path).model, seed=7)
    src.save_pretrained(tmp_path / "base", max_shard_size="1MB")
    assert len(list((tmp_path / "base").glob("model-*.safetensors"))) > 2
    reads = []

    def counting(path, framework):
        reads.append(path)
        return real_safe_open(path, framework=framework)

    monkeypatch.setattr(models, "safe_open", counting)
    engine = _engine(tmp_path / "job", f"model.path={tmp_path / 'base'}", "offload.params=nvme")
    try:
        assert len(reads) >= len(list(src.parameters()))  # one tensor at a time
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
        got = engine.trainable_tensors()
        assert got.keys() <= expected.keys() and len(got) == len(list(src.parameters()))
        assert all(torch.equal(got[n], expected[n]) for n in got)
    finally:
        engine.close(gather=False)


def test_lora_over_a_base_on_nvme_is_made_block_by_block_from_its_files(tmp_path):
    """The base stays on the meta device until the engine makes each block in its home; only peft's
    adapters (small) are made when they are added."""
    from tiertune.launch.models import base_name
    from tiertune.tuning import get_method

    src = build_model(fast_config(tmp_path).model, seed=7)
    src.save_pretrained(tmp_path / "base", max_shard_size="1MB")
    cfg = fast_config(
        tmp_path / "job", f"model.path={tmp_path / 'base'}", "tuning.method=lora", "offload.params=nvme"
    )
    model = get_method("lora").apply(skeleton(cfg.model), cfg.tuning)
    named = dict(model.named_parameters())
    assert all(p.is_meta for n, p in named.items() if "lora_" not in n)
    assert all(not p.is_meta for n, p in named.items() if "lora_" in n)
    engine = build_engine(cfg, model, torch.device("cpu"), store_dir=tmp_path / "job" / "nvme-store")
    try:
        expected = src.state_dict()
        frozen = [f for f in engine.streamer.flats if not f.trainable]
        assert frozen and all(f.home.value == "nvme" for f in frozen)
        for f in frozen:
            data = engine.streamer.resident(f)
            for name, offset, shape in zip(f.flat.names, f.flat.offsets, f.shapes):
                assert torch.equal(
                    data[offset : offset + shape.numel()].view(shape), expected[base_name(name)]
                )
    finally:
        engine.close(gather=False)


def test_a_lora_export_gathers_only_the_adapters(tmp_path):
    """The streamed base never comes back whole: the adapter file is written from the adapters alone,
    and peft loads it onto the same base."""
    from peft import PeftModel

    from tiertune.launch.models import load_tokenizer
    from tiertune.tuning import get_method

    engine = _engine(tmp_path, "tuning.method=lora", "offload.params=nvme", "offload.optimizer=nvme")
    cfg = fast_config(tmp_path)
    engine.forward_backward(BATCH, 62)
    engine.step(1e-2)
    engine.export(get_method("lora"), load_tokenizer(cfg.model), tmp_path / "adapter")
    frozen = [p for f in engine.streamer.flats if not f.trainable for p in f.params]
    assert frozen and all(0 in p.stride() for p in frozen)  # still the zero-memory placeholder
    trained = {n: p.detach().clone() for n, p in engine.model.named_parameters() if p.requires_grad}
    base = build_model(cfg.model, seed=0)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert got.keys() == trained.keys() and all(torch.equal(got[n], trained[n]) for n in got)


def test_lora_adapters_on_embeddings_start_as_peft_makes_them(tmp_path):
    engine = _engine(
        tmp_path,
        "tuning.method=lora",
        "tuning.lora.target_modules=[embed_tokens,q_proj]",
        "offload.params=nvme",
    )
    try:
        adapters = {n: t for n, t in engine.trainable_tensors().items() if "lora_embedding" in n}
        a = next(t for n, t in adapters.items() if "lora_embedding_A" in n)
        b = next(t for n, t in adapters.items() if "lora_embedding_B" in n)
        assert torch.count_nonzero(a) == 0 and 0.8 < float(b.std()) < 1.2  # peft: A zero, B N(0, 1)
        engine.forward_backward(BATCH, 62)
        engine.step(1e-2)
        assert torch.count_nonzero(engine.trainable_tensors()[next(n for n in adapters if "_A" in n)]) > 0
    finally:
        engine.close(gather=False)


def test_a_model_saved_without_its_head_prefix_loads_block_by_block(tmp_path):
    """GPT-2 checkpoints on the hub are saved from the base model ("h.0...", "wte.weight")."""
    import json

    src = build_model(fast_config(tmp_path, "model.preset=tiny-gpt2").model, seed=3)
    src.transformer.save_pretrained(tmp_path / "base")
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    engine = _engine(tmp_path / "job", f"model.path={tmp_path / 'base'}", "offload.params=nvme")
    try:
        got = engine.trainable_tensors()
        assert torch.equal(got["transformer.wte.weight"], src.transformer.wte.weight)
        assert torch.equal(got["transformer.h.1.mlp.c_fc.weight"], src.transformer.h[1].mlp.c_fc.weight)
    finally:
        engine.close(gather=False)


def test_a_damaged_weights_file_is_a_clear_error(tmp_path):
    from tiertune.errors import ModelError

    build_model(fast_config(tmp_path).model, seed=0).save_pretrained(tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="is the directory complete"):
        _engine(tmp_path / "job", f"model.path={tmp_path / 'base'}", "offload.params=nvme")


def test_a_streamed_export_is_a_model_directory_other_tools_recognise(tmp_path):
    import json

    run(fast_config(tmp_path, "offload.params=nvme", "train.max_steps=2"))
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_the_deepspeed_backend_refuses_a_locked_memory_limit_it_would_abort_on(tmp_path, monkeypatch):
    import resource

    import tiertune.offload.io as io

    monkeypatch.setattr(resource, "getrlimit", lambda what: (64 * 1024, 64 * 1024))
    monkeypatch.setattr(io.os, "geteuid", lambda: 1000)
    with pytest.raises(StoreError, match="ulimit -l"):
        from tiertune.offload import NvmeStore

        NvmeStore([tmp_path], 1 << 20, backend="deepspeed")
