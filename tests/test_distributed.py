"""Several ranks (gloo on the CPU, started by ``tiertune launch``, i.e. torchrun): every block's state sharded
over them must train exactly as one process on the whole batch, and checkpoints must not depend on how
many ranks wrote them.

Each rank trains on its slice of every micro-batch, so 2 ranks of micro-batch b see the rows of one
process of micro-batch 2b, and the gradients summed over the ranks are that process's up to float
summation order; Adam's eps is BERT's 1e-6, as in test_classification, so that an element whose gradient
is rounding noise does not take an lr-sized step of either sign.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST, fast_config, run_cli
from reference import reference_run
from safetensors.torch import load_file

from tiertune.errors import CheckpointError, ConfigError
from tiertune.launch.distributed import ranks_from_env, torchrun_argv
from tiertune.launch.loop import run
from tiertune.offload.shard import ShardGroup, span_of

LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-5
STEPS = 10
COMMON = [
    f"train.max_steps={STEPS}",
    "train.grad_accum_steps=2",
    "optim.weight_decay=0.1",
    "optim.max_grad_norm=0.5",  # clipping really active: the speculative updates are undone and redone
    "optim.eps=1e-6",
    "train.eval_max_batches=2",
]


def _launch(out, ranks, *overrides, micro_batch):
    args = [*FAST, *COMMON, f"train.micro_batch_size={micro_batch}", f"output_dir={out}", *overrides]
    done = run_cli("launch", "--nproc-per-node", str(ranks), *args, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out, step=STEPS):
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))


def _assert_close(rows, weights, ref_losses, ref_weights):
    assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=LOSS_RTOL)
    assert any(r["grad_norm"] > 0.5 for r in rows)  # clipping was really active
    assert weights.keys() == ref_weights.keys()
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=WEIGHT_ATOL, msg=name)


CASES = {
    # the optimizer state in each rank's memory, updated by its CPU; weights gathered every block
    "host": ["offload.optimizer=host"],
    # each rank's shards of weights and optimizer state on its own NVMe store, weights read into place
    # in the window and gathered, a one-block prefetch
    "nvme": ["offload.params=nvme", "offload.optimizer=nvme", "offload.prefetch_depth=1"],
    # LoRA: a frozen base and small adapter flats (some too small to reach the second rank) on NVMe
    "lora-nvme": ["tuning.method=lora", "offload.params=nvme", "offload.optimizer=nvme"],
    # a tied embedding and LM head: the head's gradient is added into the embedding's before the reduce
    # (dropout off: GPT-2 has it, and each rank draws its own masks for its rows)
    "tied-nvme": [
        "model.preset=tiny-gpt2",
        "model.dropout=0",
        "offload.params=nvme",
        "offload.optimizer=nvme",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_of_micro_batch_b_train_like_one_process_of_2b(tmp_path, case):
    """Against plain PyTorch on micro-batch 2b (tests/reference.py) and against tiertune in one process."""
    _launch(tmp_path / "ranks", 2, "train.checkpoint_every=10", *CASES[case], micro_batch=2)
    rows = _rows(tmp_path / "ranks")
    summary = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    assert summary["ranks"] == 2
    if case != "host":
        assert summary["memory"]["peak_bytes"].get("nvme", 0) > 0  # the shards really went to the drive
    assert not (tmp_path / "ranks" / "nvme-store").exists()  # every rank's store went with the run
    ref_losses, ref_weights = reference_run(
        fast_config(tmp_path / "ref", *COMMON, "train.micro_batch_size=4", *CASES[case])
    )
    _assert_close(rows, _weights(tmp_path / "ranks"), ref_losses, ref_weights)
    # the same job in one process: the same rows a step, so the same gradient norms and evaluation too
    one = run(
        fast_config(
            tmp_path / "one", *COMMON, "train.micro_batch_size=4", "train.checkpoint_every=10", *CASES[case]
        )
    )
    _assert_close(
        rows,
        _weights(tmp_path / "one"),
        [r["loss"] for r in _rows(tmp_path / "one")],
        _weights(tmp_path / "one"),
    )
    one_rows = _rows(tmp_path / "one")
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in one_rows], rel=LOSS_RTOL)
    assert summary["eval_loss"] == pytest.approx(one.eval_loss, rel=LOSS_RTOL)


def _rank_run(
    rank: int, world: int, port: int, out: str, overrides: list[str], flags: dict[str, bool]
) -> None:
    """One rank of a job run in this test's own processes (torchrun's environment set by hand), so that
    the test's switches reach the engine: the accelerator's staged weights and device-side updates, run
    on the CPU."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tiertune.offload import streaming
    from tiertune.optim import blockwise

    torch.set_num_threads(1)
    streaming.STAGE_ON_CPU, blockwise.UPDATE_ON_CPU = flags["stage"], flags["update"]
    run(fast_config(Path(out), *overrides))


SPAWNED = {
    # an accelerator's path on the CPU: NVMe shards read into host buffers then copied into place, and
    # some blocks' updates (state in memory) run by the stand-in device: state copied over and back
    "staged-device-updates": (
        ["offload.params=nvme", "offload.optimizer=host"],
        {"stage": True, "update": True},
    ),
    # no clipping: the updates made during backward (speculatively, each rank on its shards) are kept
    "kept-in-backward": (
        ["offload.optimizer=nvme", "optim.max_grad_norm=0"],
        {"stage": False, "update": False},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", SPAWNED)
def test_sharded_paths_an_accelerator_takes_train_like_plain_pytorch(tmp_path, case):
    overrides, flags = SPAWNED[case]
    job = [*COMMON, "train.micro_batch_size=2", "train.checkpoint_every=10", *overrides]
    mp.spawn(_rank_run, args=(2, _free_port(), str(tmp_path / "ranks"), job, flags), nprocs=2)
    rows = _rows(tmp_path / "ranks")
    ref_losses, ref_weights = reference_run(
        fast_config(tmp_path / "ref", *COMMON, "train.micro_batch_size=4", *overrides)
    )
    if case == "kept-in-backward":
        assert sum(r["updates_in_backward"] for r in rows) > 0 and not any(r["updates_undone"] for r in rows)
        assert [r["loss"] for r in rows] == pytest.approx(ref_losses, rel=LOSS_RTOL)
        weights = _weights(tmp_path / "ranks")
        for name, w in ref_weights.items():
            torch.testing.assert_close(weights[name], w, rtol=0, atol=WEIGHT_ATOL, msg=name)
    else:
        _assert_close(rows, _weights(tmp_path / "ranks"), ref_losses, ref_weights)


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_one_and_on_four_and_the_runs_agree(tmp_path):
    nvme = [
        "offload.params=nvme",
        "offload.optimizer=nvme",
        "train.checkpoint_every=5",
        "train.keep_checkpoints=3",
    ]
    _launch(tmp_path / "two", 2, *nvme, micro_batch=2)
    whole = _weights(tmp_path / "two")
    losses = [r["loss"] for r in _rows(tmp_path / "two")]
    for ranks, micro_batch in ((1, 4), (4, 1)):
        out = tmp_path / f"on-{ranks}"
        shutil.copytree(
            tmp_path / "two" / "checkpoints" / "step-00000005", out / "checkpoints" / "step-00000005"
        )
        shutil.copy(tmp_path / "two" / "metrics.jsonl", out)  # the rows after step 5 are dropped on resume
        if ranks == 1:
            run(fast_config(out, *COMMON, *nvme, f"train.micro_batch_size={micro_batch}"))
        else:
            done = _launch(out, ranks, *nvme, micro_batch=micro_batch)
            assert "written by 2 rank(s); resuming on 4" in done.stderr
        assert [r["loss"] for r in _rows(out)] == pytest.approx(losses, rel=LOSS_RTOL)
        resumed = _weights(out)
        assert resumed.keys() == whole.keys()
        for name, w in whole.items():
            torch.testing.assert_close(resumed[name], w, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_a_checkpoint_resumes_only_with_as_many_rows_a_step_and_says_what_to_set(tmp_path):
    """The rows a step trains on are micro-batch x accumulation x ranks: the ranks may change, in step."""
    run(fast_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2", "train.micro_batch_size=4"))
    state = tmp_path / "checkpoints" / "step-00000002" / "loop_state.json"
    payload = json.loads(state.read_text())
    payload["ranks"] = 2  # as if two ranks of micro-batch 4 had written it: 8 rows a step
    state.write_text(json.dumps(payload))
    manifest = tmp_path / "checkpoints" / "step-00000002" / "manifest.json"  # keep it verifiable
    m = json.loads(manifest.read_text())
    m["files"]["loop_state.json"] = {
        "bytes": state.stat().st_size,
        "sha256": hashlib.sha256(state.read_bytes()).hexdigest(),
    }
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"trains 8 rows a step .* set train.micro_batch_size=8"):
        run(fast_config(tmp_path, "train.max_steps=4", "train.micro_batch_size=4"))


# -- the pieces ------------------------------------------------------------------------------------------


def test_shards_are_whole_pages_and_cover_the_flat_in_rank_order():
    for numel, itemsize, world in ((1000, 4, 2), (10**6 + 3, 2, 4), (5, 4, 3), (4096, 1, 4)):
        spans = [span_of(numel, itemsize, r, world) for r in range(world)]
        assert all((s.size * itemsize) % 4096 == 0 for s in spans)
        assert spans[0].lo == 0 and spans[-1].hi == numel
        assert all(a.hi == b.lo for a, b in zip(spans, spans[1:]))
        assert sum(s.numel for s in spans) == numel
        assert all(s.full >= numel for s in spans)
    tiny = [span_of(10, 4, r, 4) for r in range(4)]  # a flat smaller than a page: rank 0 holds it all
    assert tiny[0].numel == 10 and all(s.numel == 0 for s in tiny[1:])


def test_launch_takes_torchruns_options_then_the_job():
    assert torchrun_argv(["--nproc-per-node", "2", "job.yaml", "optim.lr=1e-3"]) == [
        "--nproc-per-node", "2", "-m", "tiertune", "train", "job.yaml", "optim.lr=1e-3"
    ]  # fmt: skip
    assert torchrun_argv(["--nproc-per-node=2", "--standalone", "train.max_steps=3"]) == [
        "--nproc-per-node=2", "--standalone", "-m", "tiertune", "train", "train.max_steps=3"
    ]  # fmt: skip
    assert torchrun_argv(["--nnodes", "2"])[-3:] == ["-m", "tiertune", "train"]  # the default job
    with pytest.raises(ConfigError, match="--nproc-per-nod is not an option of torchrun"):
        torchrun_argv(["--nproc-per-nod", "2", "job.yaml"])
    with pytest.raises(ConfigError, match="drop -m"):
        torchrun_argv(["-m", "job.yaml"])


def test_a_bad_launch_option_is_refused_before_anything_starts():
    done = run_cli("launch", "--nprocs", "2")
    assert done.returncode == 2 and "--nprocs is not an option of torchrun" in done.stderr


@pytest.mark.slow
def test_a_rank_that_refuses_its_job_stops_the_launch_with_its_message_and_status_2(tmp_path):
    done = run_cli(
        "launch", "--nproc-per-node", "2", *FAST, "train.max_steps=3", "optim.warmup_steps=9",
        f"output_dir={tmp_path}",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "optim.warmup_steps: 9 is more than train.max_steps (3)" in done.stderr
    assert "failed with exit status 2; every rank was stopped" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_rank_is_read_from_torchruns_environment():
    assert ranks_from_env({}) is None and ranks_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    r = ranks_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (r.rank, r.world, r.local_rank, r.local_world) == (3, 4, 1, 2)
    with pytest.raises(ConfigError, match="start the job with torchrun"):
        ranks_from_env({"WORLD_SIZE": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class _Target:  # what the reducer needs of an optimizer state
    flat: SimpleNamespace
    span: object
    grad: torch.Tensor
    touched: list[bool]


def _reducer_rank(rank: int, world: int, port: int, results) -> None:
    """Two flats, reduced out of order: the second (in forward order) completes first, as backward has it;
    on rank 1 the first flat's second parameter gets no gradient, on rank 0 it does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from tiertune.memory import Ledger
        from tiertune.optim.reduce import GradReducer

        group = ShardGroup(rank, world)
        targets = []
        for sizes in ((3000, 2000), (1500,)):
            params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            flat = SimpleNamespace(params=params, flat=SimpleNamespace(offsets=offsets))
            span = span_of(sum(sizes), 4, rank, world)
            targets.append(_Target(flat, span, torch.zeros(span.numel), [False] * len(sizes)))
        landed = []
        reducer = GradReducer(
            group,
            targets,
            torch.device("cpu"),
            Ledger(),
            on_reduced=lambda t, c: landed.append((targets.index(t), c)),
        )
        grads = {
            (k, i): torch.arange(n, dtype=torch.float32) * (rank + 1) + 10 * k
            for k, sizes in enumerate(((3000, 2000), (1500,)))
            for i, n in enumerate(sizes)
        }
        reducer.add(targets[1], 0, grads[(1, 0)])  # the second flat completes: it goes out at once
        reducer.add(targets[0], 0, grads[(0, 0)])
        if rank == 0:
            reducer.add(targets[0], 1, grads[(0, 1)])
        reducer.finish()
        results[rank] = (
            [t.grad.clone() for t in targets],
            [list(t.touched) for t in targets],
            landed,
            [t.span for t in targets],
        )
    finally:
        dist.destroy_process_group()


def test_the_reducer_sums_each_flat_into_every_ranks_shard_in_one_order():
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_reducer_rank, args=(world, _free_port(), results), nprocs=world)
    for rank in range(world):
        grads, touched, landed, spans = results[rank]
        assert touched == [[True, True], [True]]  # a gradient on any rank: touched on every rank
        # the second flat went out first (complete); the first after it, complete on rank 0 only (rank 1
        # sent it at the end of the backward), and the same reductions in the same order on both ranks
        assert landed == [(1, True), (0, rank == 0)]
        want = [
            torch.cat([torch.arange(3000.0) * 3, torch.arange(2000.0) * 1]),  # rank 1 sent zeros for it
            torch.arange(1500.0) * 3 + 20,
        ]
        for g, w, span in zip(grads, want, spans):
            torch.testing.assert_close(g, w[span.lo : span.hi])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
