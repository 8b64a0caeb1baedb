"""The reliability suite: crashes, corrupted state, full disks, hostile input, a long run and jobs that collide,
each driven end to end through the real CLI (``tiertune.launch.cli.main``, in this process, or
``tests/_hooked_cli.py`` in a child process where the job must be killed or held) and the training loop.

What an error must look like, everywhere here: exit status 2, ``tiertune: error: ...`` naming the problem
and what to do, no traceback; and nothing that was saved is lost or overwritten.

Narrower tests of the same parts: a SIGKILL between steps (test_loop.py), damaged checkpoints and a write
that fails inside torch (test_checkpoint.py), the store's checksums, full disk and lock on their own
(test_store.py, test_streaming.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, REPO
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tiertune.config import iter_keys, load_config
from tiertune.launch import checkpoint as ckpt
from tiertune.launch import engine, loop
from tiertune.launch.cli import main

MIB = 2**20
# conftest's FAST job with a fixed memory budget: the plan must not change with what other programs on the
# machine hold at the moment (2 GiB is far more than these jobs need).
JOB = [*FAST, "memory.host_budget_gib=2"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    """``tiertune ARGV`` through the CLI's entry point in this process: (exit status, stderr). argparse
    exits by itself on arguments it cannot parse (status 2, with its usage), as in a process."""
    capsys.readouterr()
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def train(capsys, *args: str) -> tuple[int, str]:
    return cli(capsys, "train", *args)


def assert_refused(status: int, err: str, *needles: str) -> None:
    """A user error as the CLI must report it: status 2, one clean message, every needle in it."""
    assert status == 2, err
    assert "Traceback" not in err, err
    assert "tiertune: error: " in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def hooked_cli(*args: str) -> list[str]:
    """The command running tests/_hooked_cli.py: the CLI with a kill or a pause hooked in."""
    return [sys.executable, str(REPO / "tests" / "_hooked_cli.py"), *args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trajectory(out: Path) -> list[dict]:
    """The rows of metrics.jsonl without the wall-clock and memory readings."""
    keep = ("step", "loss", "lr", "grad_norm", "target_tokens", "eval_loss")
    return [{k: v for k, v in r.items() if k in keep} for r in metrics(out)]


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` but the lock (whose holder's pid each job writes)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def tiny_model_dir(path: Path, hidden: int) -> Path:
    """A local HuggingFace model directory: a 2-layer Llama ``hidden`` wide, with the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiertune.launch.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


# -- 1. SIGKILL at any point, then resume ----------------------------------------------------------------

# Weights and optimizer state on NVMe, a checkpoint every 3 steps: a killed run resumes from a checkpoint
# and from a store the kill left behind.
KILL_JOB = [
    *JOB,
    "data.seq_len=32",
    "train.micro_batch_size=2",
    "train.max_steps=12",
    "train.checkpoint_every=3",
    "train.tensorboard=off",
    "offload.params=nvme",
    "offload.optimizer=nvme",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", *KILL_JOB, f"output_dir={out}"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, seed", [("forward", 101), ("backward", 202), ("optimizer", 303), ("checkpoint", 404)]
)
def test_sigkill_at_a_random_point_then_resume_ends_bit_for_bit_as_the_uninterrupted_run(
    tmp_path, capsys, uninterrupted, point, seed
):
    """The child picks the step (after the first checkpoint), the layer, the block or the stage of the
    save from ``seed`` (tests/_hooked_cli.py); another seed tries other points."""
    command = hooked_cli("kill", point, str(seed), "--", *KILL_JOB, f"output_dir={tmp_path}")
    killed = subprocess.run(command, cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    where = re.search(r"kill point: (.*)", killed.stderr)
    assert where and where.group(1).startswith(point), killed.stderr
    published = [c.step for c in ckpt.list_checkpoints(tmp_path)]
    assert published and published[-1] < 12, (where.group(1), published)
    partial = list((tmp_path / "checkpoints").glob(".tmp-*"))
    if point == "checkpoint":  # killed with some of the files written, before the save was published
        assert len(partial) == 1 and any(partial[0].iterdir()), where.group(1)
        assert (partial[0] / ckpt.MANIFEST).exists() == where.group(1).endswith("before the rename")

    status, err = train(capsys, *KILL_JOB, f"output_dir={tmp_path}")  # train.resume=auto: the default
    assert status == 0, err
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{published[-1]:08d}'}" in err, err
    if partial:
        assert f"removed {partial[0].name}, an interrupted checkpoint save" in err
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))

    # fp32 on CPU is deterministic: the same losses, weights and moments, bit for bit.
    assert trajectory(tmp_path) == trajectory(uninterrupted)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (uninterrupted, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = Path("checkpoints") / "step-00000012"
    oa, ob = (
        torch.load(d / last / "optimizer.pt", weights_only=True)["state"] for d in (uninterrupted, tmp_path)
    )
    assert oa.keys() == ob.keys() and len(oa) > 0
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


# -- 2. Corrupted state, damaged or foreign checkpoints --------------------------------------------------


def flip_store_bytes(store_dir: Path) -> int:
    """Flip one byte in every 4 KiB page of the store's files, behind the store's back; the pages flipped."""
    flipped = 0
    for path in store_dir.glob("tiertune-store-*.bin"):
        fd = os.open(path, os.O_RDWR)
        try:
            for offset in range(17, os.fstat(fd).st_size, 4096):
                byte = os.pread(fd, 1, offset)
                os.pwrite(fd, bytes([byte[0] ^ 0xA5]), offset)
                flipped += 1
            os.fsync(fd)  # on the drive before the store's next O_DIRECT read
        finally:
            os.close(fd)
    return flipped


def test_a_corrupted_nvme_extent_stops_the_run_cleanly_and_keeps_the_checkpoints(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    job = [
        *JOB,
        "data.seq_len=32",
        "train.micro_batch_size=2",
        "train.max_steps=6",
        "train.checkpoint_every=2",
    ]
    job += ["train.tensorboard=off", "offload.params=nvme", "offload.optimizer=nvme", f"output_dir={out}"]
    store_dir = out / "nvme-store"
    flipped = []

    def corrupt(row: dict) -> None:
        if row["step"] == 2:  # after its checkpoint: step 3 reads what was altered
            flipped.append(flip_store_bytes(store_dir))

    run = loop.run
    monkeypatch.setattr(loop, "run", lambda cfg, callbacks=(): run(cfg, [*callbacks, corrupt]))
    status, err = train(capsys, *job)
    assert flipped and flipped[0] > 0
    assert_refused(
        status, err, "do not match what was written", str(store_dir / "tiertune-store-0.bin"), "rerun"
    )
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2]  # intact, and no newer one
    ckpt.verify_checkpoint(out / "checkpoints" / "step-00000002")
    assert metrics(out)[-1]["step"] == 2 and not store_dir.exists()

    status, err = train(capsys, *job)  # as the message says: rerun, and it resumes from step 2
    assert status == 0 and "(step 2)" in err, err
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[int, Path]:
    """Two local models of the same family and vocabulary, 64 and 96 wide."""
    root = tmp_path_factory.mktemp("models")
    return {hidden: tiny_model_dir(root / f"hidden-{hidden}", hidden) for hidden in (64, 96)}


@pytest.mark.parametrize("change", ["truncated optimizer.pt", "another model", "another hidden size"])
def test_a_damaged_or_foreign_checkpoint_is_refused_and_nothing_is_overwritten(
    tmp_path, capsys, model_dirs, change
):
    model = tmp_path / "model"
    shutil.copytree(model_dirs[64], model)
    out = tmp_path / "run"
    job = [*JOB, "data.seq_len=32", "train.checkpoint_every=1", "train.tensorboard=off", f"output_dir={out}"]
    status, err = train(capsys, *job, f"model.path={model}", "train.max_steps=2")
    assert status == 0, err
    latest = out / "checkpoints" / "step-00000002"
    again = [f"model.path={model}"]
    if change == "truncated optimizer.pt":
        data = (latest / "optimizer.pt").read_bytes()
        (latest / "optimizer.pt").write_bytes(data[:-100])
        expected = [f"checkpoint {latest} is damaged and was not loaded", "optimizer.pt has", "Move that"]
    elif change == "another model":
        again = ["model.path=null", "model.preset=tiny-llama"]
        expected = [f"checkpoint {latest} belongs to a different job", "model.preset: None -> 'tiny-llama'"]
    else:  # the same model.path, now a model 96 wide: config.json is in the fingerprint
        shutil.rmtree(model)
        shutil.copytree(model_dirs[96], model)
        expected = ["the base model weights changed since checkpoint", str(latest)]
    saved = snapshot(out)

    status, err = train(capsys, *job, *again, "train.max_steps=4")
    assert_refused(status, err, *expected)
    assert snapshot(out) == saved  # byte for byte: no file changed, none removed, none added


# -- 3. Full disks ---------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(mib)``: a new tmpfs of that size (a small disk of its own), unmounted at the end."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        point = tmp_path / f"disk-{len(mounted)}"
        point.mkdir()
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(point)],
                capture_output=True,
                text=True,
            )
            why = done.stderr.strip() if done.returncode else None
        except OSError as e:  # no mount(8) here
            why = str(e)
        if why is not None:
            pytest.skip(f"cannot mount a tmpfs here ({why}): the full-disk checks need one")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_disk_that_fills_mid_run_stops_with_a_clear_error_and_the_last_checkpoint_resumes(
    tmp_path, capsys, tmpfs, monkeypatch
):
    """The default job (optimizer state in a store in the run directory) on a disk of its own that
    another writer fills after the first checkpoint, leaving room for half a checkpoint."""
    out = tmpfs(128)
    job = [*JOB, "data.seq_len=32", "train.max_steps=6", "train.checkpoint_every=2", f"output_dir={out}"]
    filler = out / "someone-else.bin"

    def fill(row: dict) -> None:
        if row["step"] == 2:
            size = sum(p.stat().st_size for p in (out / "checkpoints" / "step-00000002").iterdir())
            room = shutil.disk_usage(out).free - size // 2
            with open(filler, "wb") as f:
                f.write(b"\0" * room)

    run = loop.run
    monkeypatch.setattr(loop, "run", lambda cfg, callbacks=(): run(cfg, [*callbacks, fill]))
    status, err = train(capsys, *job)
    assert_refused(
        status,
        err,
        "cannot write checkpoint step 4",
        "no space left on the device",
        f"the last complete checkpoint ({out / 'checkpoints' / 'step-00000002'}) is intact",
    )
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2]
    ckpt.verify_checkpoint(out / "checkpoints" / "step-00000002")
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written save is gone

    filler.unlink()  # room made, as the message says, and more for the end of the run
    subprocess.run(["mount", "-o", "remount,size=256m", str(out)], check=True)
    monkeypatch.setattr(loop, "run", run)
    status, err = train(capsys, *job)
    assert status == 0 and f"resumed from {out / 'checkpoints' / 'step-00000002'} (step 2)" in err, err
    assert [c.step for c in ckpt.list_checkpoints(out)] == [4, 6]


@pytest.mark.parametrize("found_by", ["the plan", "preallocation"])
def test_an_nvme_store_on_a_disk_too_small_is_refused_at_start(
    tmp_path, capsys, tmpfs, monkeypatch, found_by
):
    """The plan sizes the NVMe tier by the free space; the store then preallocates its file, which finds a
    disk that filled in between (here: a plan told there is a GiB free)."""
    small = tmpfs(8)  # the optimizer state of tiny-llama is 23 MiB
    out = tmp_path / "run"
    if found_by == "the plan":
        expected = ["offload.optimizer=nvme", "do not fit in the nvme tier", "free space in offload.nvme_dir"]
    else:
        monkeypatch.setattr(engine, "nvme_free_bytes", lambda dirs: 2**30)
        expected = [f"the NVMe store needs 0.02 GiB in {str(small)!r} but only 0.01 GiB is free"]
    status, err = train(
        capsys, *JOB, "offload.optimizer=nvme", f"offload.nvme_dir=[{small}]", f"output_dir={out}"
    )
    assert_refused(status, err, *expected)
    assert not (out / "metrics.jsonl").exists()  # refused before any step
    assert [p.name for p in small.iterdir()] in ([], ["tiertune-store.lock"])  # no store file left


# -- 4. Hostile config and data --------------------------------------------------------------------------

KEYS = [key for key, _, _ in iter_keys()]
FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

BAD_VALUES = st.one_of(
    st.sampled_from(
        ["", " ", "=", "-1", "0", "-0", "1.5", "1e999", "nan", "-inf", "2**32", "1_000", "0x10"]  # numbers
        + ["99999999999999999999999", "abc", "🙂", "auto", "fp64", "cuda:7", "true", "null", "none"]  # words
        + ["[", "[1, 2", "[1, a]", "[[1]]", "[]", "{}", "{a: 1}", "a,b", "*x", "&a [*a]"]  # lists, YAML
        + ["/nonexistent/x", "/dev/null", str(REPO), "builtin:nope"]  # paths
    ),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
FUZZ_KEYS = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k[:-1] or k),  # a typo
    st.sampled_from(KEYS).map(lambda k: k + ".x"),  # a key below a leaf
    st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[0]),  # a section as a value
    st.text(alphabet="abcdefgt._ ", min_size=1, max_size=16),
)
OVERRIDES = st.lists(
    st.one_of(st.tuples(FUZZ_KEYS, BAD_VALUES).map("=".join), st.text(max_size=10)), min_size=1, max_size=4
)


def _keys_named(problem: str, keys: set[str]) -> bool:
    """``problem`` names one of ``keys`` or a section above it (the key that is wrong is the section's)."""
    for key in keys:
        parts = key.split(".")
        for above in (".".join(parts[:n]) for n in range(1, len(parts) + 1)):
            if above in problem or repr(above) in problem:  # keys are quoted with repr
                return True
    return False


@FUZZ
@given(overrides=OVERRIDES)
@example(overrides=[f"data.path={REPO}"])  # was refused as a path that does not exist
def test_fuzzed_overrides_are_accepted_or_refused_by_key(tmp_path, capsys, overrides):
    job = tmp_path / "job.yaml"
    job.write_text("train: {}\n")
    status, err = cli(capsys, "validate", str(job), *overrides)
    assert status in (0, 2), err
    if status == 2:
        assert_refused(status, err)
        problems = [line[4:] for line in err.splitlines() if line.startswith("  - ")]
        if not problems:  # argparse's own: an override that reads as an option
            problems = [err.rsplit("tiertune: error: ", 1)[1]]
        named = {o.partition("=")[0].strip() for o in overrides}
        for problem in problems:
            assert _keys_named(problem, named) or any(
                repr(o) in problem or o in problem for o in overrides
            ), problem
            gone = re.search(r"'([^']+)' does not exist", problem)
            assert gone is None or not Path(gone.group(1)).exists(), problem  # and says what is true


SECTIONS = sorted({k.split(".")[0] for k in KEYS})
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10), st.sampled_from(KEYS)
)
YAML_TREES = st.recursive(
    YAML_SCALARS,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.one_of(
                st.sampled_from(SECTIONS), st.sampled_from([k.rsplit(".", 1)[-1] for k in KEYS]), YAML_SCALARS
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=10,
)
# Documents in the schema's own shape (so values reach the keys' checks), any document, or any text.
SHAPED = st.dictionaries(
    st.sampled_from(SECTIONS),
    st.dictionaries(st.sampled_from([k.split(".", 1)[-1] for k in KEYS if "." in k]), YAML_TREES, max_size=3),
    max_size=3,
)
YAML_TEXTS = st.one_of(
    SHAPED.map(yaml.safe_dump),
    YAML_TREES.map(yaml.safe_dump),
    st.sampled_from(
        [
            "{{{",
            "train: [",
            "a: &x [*x]\n",
            "train: &x {a: *x}\n",
            "\t- x",
            "%YAML 9\n---\n",
            "--- !!python/object:os.system\n",
        ]
    ),
    st.text(max_size=40),
)


@FUZZ
@given(text=YAML_TEXTS, as_bytes=st.booleans())
def test_fuzzed_config_files_are_accepted_or_refused_naming_the_file(tmp_path, capsys, text, as_bytes):
    job = tmp_path / "job.yaml"
    job.write_bytes(text.encode("utf-8", "surrogatepass") + (b"\xff\xfe" if as_bytes else b""))
    status, err = cli(capsys, "validate", str(job))
    assert status in (0, 2), err
    if status == 2:
        assert_refused(status, err, str(job))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=5,
)
TEXTS = st.one_of(st.text(min_size=1, max_size=30), JSON_VALUES)
ROWS = st.one_of(
    st.fixed_dictionaries({"text": TEXTS}).map(json.dumps),
    st.fixed_dictionaries({"prompt": TEXTS, "completion": TEXTS}).map(json.dumps),
    st.fixed_dictionaries({"text": TEXTS, "label": JSON_VALUES}).map(json.dumps),
    st.dictionaries(
        st.sampled_from(["text", "prompt", "completion", "label", "meta"]), JSON_VALUES, max_size=3
    ).map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.sampled_from(
        ['{"text": "\\ud800"}', '{"text": "a\\u0000b"}', '{"text": NaN}', '{"text": "x"', "\x00", "[]"]
    ),
    st.text(max_size=20),  # not JSON
)
DATASETS = st.one_of(
    st.tuples(st.just(".jsonl"), st.lists(ROWS, max_size=6).map(lambda rows: "\n".join(rows).encode())),
    st.tuples(st.just(".txt"), st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))),
    st.tuples(st.sampled_from([".jsonl", ".txt"]), st.binary(max_size=40)),
)
RUNS = itertools.count()
DATASET_JOB = [
    *JOB,
    "data.seq_len=16",
    "train.micro_batch_size=1",
    "train.max_steps=1",
    "optim.warmup_steps=0",
    "train.eval_max_batches=1",
    "train.tensorboard=off",
    "offload.optimizer=auto",
]


@settings(FUZZ, max_examples=60)
@given(dataset=DATASETS, task=st.sampled_from(["causal_lm", "sequence_classification"]))
# Found by this test: half a UTF-16 surrogate pair, which JSON can escape, reached the tokenizer (a
# TypeError); a classifier's dataset without two labels was refused without naming the file.
@example(dataset=(".jsonl", b'{"text": "ok"}\n{"text": "half a pair \\ud800"}'), task="causal_lm")
@example(dataset=(".txt", b"0"), task="sequence_classification")
@example(dataset=(".jsonl", b'{"text": 5}'), task="causal_lm")
def test_fuzzed_datasets_train_or_are_refused_naming_the_file_and_line(tmp_path, capsys, dataset, task):
    """The cheapest way through the real reading, tokenizing and packing (or encoding, for a classifier)
    of a dataset: a one-step job of 16-token rows (a bad dataset is refused before the model is built)."""
    suffix, data = dataset
    run = next(RUNS)
    path = tmp_path / f"data-{run}{suffix}"
    path.write_bytes(data)
    job = [*DATASET_JOB, f"model.task={task}", f"data.path={path}", f"output_dir={tmp_path / f'out-{run}'}"]
    status, err = train(capsys, *job)
    assert status in (0, 2), err
    if status == 2:
        assert_refused(status, err, str(path))
        if "bad row(s)" in err:
            assert re.search(r"line \d+: ", err), err


# -- 5. A long run stays flat ----------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_a_soak_run_of_500_steps_keeps_memory_and_file_descriptors_flat(tmp_path):
    rss, fds = [], []

    def sample(row: dict) -> None:
        rss.append(_rss_bytes())
        fds.append(len(os.listdir("/proc/self/fd")))

    cfg = load_config(
        None,
        [
            *JOB,
            "data.seq_len=32",
            "train.micro_batch_size=2",
            "train.max_steps=500",
            "train.checkpoint_every=100",
            "train.eval_every=100",
            "train.tensorboard=off",
            "offload.params=nvme",
            "offload.optimizer=nvme",
            f"output_dir={tmp_path}",
        ],
    )
    started = time.perf_counter()
    loop.run(cfg, callbacks=[sample])
    # Warm-up: the first steps, and the first eval and checkpoint (step 100), which allocate their buffers
    # once (+5.6 MiB here); the four evals and checkpoints after it must not add to them.
    warm, tail = statistics.median(rss[100:150]), statistics.median(rss[-50:])
    jumps = [
        (i + 2, round((b - a) / MIB, 1)) for i, (a, b) in enumerate(zip(rss, rss[1:])) if abs(b - a) > MIB / 4
    ]
    print(
        f"soak: 500 steps in {time.perf_counter() - started:.0f}s; RSS MiB at steps 1/50/100/101/250/500: "
        + "/".join(f"{rss[i] / MIB:.1f}" for i in (0, 49, 99, 100, 249, 499))
        + f"; median of steps 101-150 {warm / MIB:.1f}, of the last 50 {tail / MIB:.1f}; steps where it moved "
        f"by over 0.25 MiB (step, MiB): {jumps}; open fds: min {min(fds)}, max {max(fds)}, at step 100 "
        f"{fds[99]}, at the end {fds[-1]}"
    )
    assert len(set(fds[99:])) == 1, fds  # every file the run opens after warm-up is closed again
    assert tail - warm < 2 * MIB, (warm, tail)


# -- 6. Jobs that collide --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_job_is_refused_a_store_or_an_output_dir_in_use_and_the_first_finishes(tmp_path, capsys):
    store = tmp_path / "nvme"
    store.mkdir()
    holding, release = tmp_path / "holding", tmp_path / "release"
    common = [*JOB, "train.max_steps=3", "train.tensorboard=off", "offload.optimizer=nvme"]
    job = [*common, f"offload.nvme_dir=[{store}]"]
    command = hooked_cli("hold", str(holding), str(release), "--", *job, f"output_dir={tmp_path / 'a'}")
    first = subprocess.Popen(
        command, cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not holding.exists():  # the first job has done a step: it holds the store
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1]
            time.sleep(0.1)
        assert list(store.glob("tiertune-store-*.bin")) and metrics(tmp_path / "a")

        status, err = train(capsys, *job, f"output_dir={tmp_path / 'b'}")
        assert_refused(status, err, f"the NVMe store in {str(store)!r} is in use by another job")
        assert list(store.glob("tiertune-store-*.bin"))  # the refused job left the first one's store be

        other = tmp_path / "other-nvme"
        other.mkdir()
        status, err = train(capsys, *common, f"offload.nvme_dir=[{other}]", f"output_dir={tmp_path / 'a'}")
        assert_refused(status, err, f"output_dir {str(tmp_path / 'a')!r} is in use by another tiertune job")
    finally:
        release.touch()
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert [r["step"] for r in metrics(tmp_path / "a")] == [1, 2, 3] and "done: 3 steps" in out
