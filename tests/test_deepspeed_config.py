"""DeepSpeed configs read as a job's keys and written back (tiertune.config.deepspeed)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from conftest import REPO, run_cli

from tiertune.config import load_config
from tiertune.config.deepspeed import from_deepspeed, to_deepspeed
from tiertune.errors import ConfigError

EXAMPLES = sorted((REPO / "examples" / "deepspeed").glob("*.json"))


def test_examples_exist():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_maps_onto_a_job_and_back_to_the_same_values(path):
    """ds config -> the job's keys -> a DeepSpeed config -> the job's keys again: every mapped value the
    same, and what was written back is DeepSpeed's own (the offload devices and paths, the optimizer)."""
    ds = json.loads(path.read_text())
    first = from_deepspeed(ds)
    assert not first.problems
    cfg = load_config(None, [f"deepspeed={path}"])
    for key, value in first.values.items():  # the job took every mapped value
        section, leaf = key.rsplit(".", 1)
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        assert getattr(node, leaf) == value, key
    back = to_deepspeed(cfg)
    again = from_deepspeed(back)
    assert not again.problems
    assert {k: again.values[k] for k in first.values} == first.values
    zero = ds.get("zero_optimization", {})
    for section in ("offload_param", "offload_optimizer"):
        device = zero.get(section, {}).get("device", "none")
        assert back["zero_optimization"][section]["device"] == device
        if device == "nvme":
            assert back["zero_optimization"][section]["nvme_path"] == zero[section]["nvme_path"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_deepspeed_itself_reads_the_config_a_job_is_written_as(path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, [f"deepspeed={path}"])
    parsed = DeepSpeedConfig(to_deepspeed(cfg))
    assert parsed.zero_optimization_stage == 3
    assert parsed.train_micro_batch_size_per_gpu == cfg.train.micro_batch_size
    assert parsed.gradient_accumulation_steps == cfg.train.grad_accum_steps
    assert parsed.gradient_clipping == cfg.optim.max_grad_norm
    assert parsed.optimizer_params["lr"] == cfg.optim.lr


def test_the_jobs_own_keys_win_over_the_deepspeed_config(tmp_path):
    path = REPO / "examples" / "deepspeed" / "zero3-nvme.json"
    cfg = load_config(None, [f"deepspeed={path}", "optim.lr=1e-3", "offload.params=host"])
    assert cfg.optim.lr == 1e-3 and cfg.offload.params == "host"
    assert cfg.offload.optimizer == "nvme" and cfg.train.micro_batch_size == 4  # the rest as it says


def test_what_would_change_the_training_is_refused_with_the_reason():
    ds = {
        "fp16": {"enabled": True},
        "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},  # DeepSpeed's log warmup
        "zero_optimization": {
            "stage": 2,
            "offload_param": {"device": "cpu"},
            "offload_optimizer": {"device": "nvme", "ratio": 0.3},
            "zero_quantized_weights": True,
            "overlap_comms": True,
        },
        "train_batch_size": 24,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "monitor": {},
    }
    problems = "\n".join(from_deepspeed(ds, ranks=2).problems)
    for expected in (
        "fp16: fp16 with loss scaling is not supported: use bf16",
        "optimizer.type: 'Lamb' is not supported",
        "warmup_type: DeepSpeed warms up logarithmically",
        "offload_param: DeepSpeed offloads weights only at stage 3",
        "offload_optimizer.nvme_path: needed with device nvme",
        "offload_optimizer.ratio: 0.3: a partial offload",
        "zero_quantized_weights: quantized ZeRO changes the numbers",
        "zero_optimization.overlap_comms: not a DeepSpeed key this project knows (did you mean 'overlap_comm'?)",
        "train_batch_size: 24 is not train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks = 4 x 2 x 2",
        "monitor: not a DeepSpeed key this project knows",
    ):
        assert expected in problems
    with pytest.raises(ConfigError, match=r"deepspeed \(.*\): fp16"):
        path = REPO / "examples" / "deepspeed" / "bad.json"
        try:
            path.write_text(json.dumps(ds))
            load_config(None, [f"deepspeed={path}"])
        finally:
            os.remove(path)


def test_the_batch_is_derived_from_train_batch_size_over_the_ranks():
    m = from_deepspeed({"train_batch_size": 32, "gradient_accumulation_steps": 2}, ranks=4)
    assert not m.problems and m.values["train.micro_batch_size"] == 4


def test_a_missing_or_broken_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, [f"deepspeed={tmp_path / 'nope.json'}"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .* as JSON"):
        load_config(None, [f"deepspeed={tmp_path / 'bad.json'}"])


def test_validate_reports_what_maps_and_what_is_left_to_tiertune():
    done = run_cli("validate", "--deepspeed", "examples/deepspeed/zero3-nvme.json")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "zero_optimization.offload_param.device -> offload.params='nvme'" in out
    assert "zero_optimization.*.nvme_path -> offload.nvme_dir=['runs/nvme']" in out
    assert "aio: left to tiertune" in out and "zero_optimization.stage=3" in out
    done = run_cli("validate", "--deepspeed", "examples/deepspeed/zero3-nvme.json", "optim.lr=1e-3")
    assert "optimizer.params.lr -> optim.lr=0.0003 (the job's own optim.lr=0.001 wins)" in done.stdout


def test_a_job_is_written_as_a_deepspeed_config(tmp_path):
    done = run_cli(
        "deepspeed-config", "examples/tiny-llama-full.yaml", "offload.optimizer=nvme",
        f"offload.nvme_dir=[{tmp_path}]", "--out", str(tmp_path / "ds.json"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ds = json.loads((tmp_path / "ds.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "nvme_path": str(tmp_path)}
    assert ds["zero_optimization"]["offload_param"] == {
        "device": "none"
    }  # auto: the plan keeps them on the device
    with pytest.raises(ConfigError, match="DeepSpeed's linear decay"):
        to_deepspeed(load_config(None, ["optim.schedule=linear"]))
