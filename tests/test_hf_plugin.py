"""The HF Trainer plugin: an unmodified transformers.Trainer with tiertune's offload engine and optimizer
must train exactly as the plain Trainer does (tiertune.launch.hf_plugin)."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from tiertune.config import DataConfig, ModelConfig
from tiertune.errors import ConfigError
from tiertune.launch.data import build_splits
from tiertune.launch.hf_plugin import TiertunePlugin
from tiertune.launch.models import build_model, load_tokenizer

MODEL = ModelConfig(preset="tiny-llama")
NVME = {"offload.params": "nvme", "offload.optimizer": "nvme", "offload.prefetch_depth": 0}
# Observed bit for bit (the same kernels on the same numbers: torch's fused AdamW and tiertune's, equal to
# it bit for bit); stated as a tolerance that leaves room for a kernel that rounds otherwise.
RTOL, ATOL = 1e-6, 1e-6


@pytest.fixture(scope="module")
def data():
    rows = build_splits(DataConfig(seq_len=64), load_tokenizer(MODEL), 0).train
    return [{"input_ids": rows.input_ids[i], "labels": rows.labels[i]} for i in range(128)]


def _args(out, **kw):
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # accumulated: each micro-batch's gradients summed in the homes
        max_steps=6,
        learning_rate=2e-3,
        weight_decay=0.1,
        max_grad_norm=0.5,  # really clipping: the norms are 3-10
        adam_epsilon=1e-6,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        logging_steps=1,
        report_to=[],
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy=kw.pop("save_strategy", "no"),
        **kw,
    )


def _model(lora=False, preset=None):
    model = build_model(ModelConfig(preset=preset) if preset else MODEL, seed=0)
    if lora:
        torch.manual_seed(0)  # the adapters' initial values
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


def _train(tmp_path, data, options=None, lora=False, resume=None, preset=None, **kw):
    """Train with a plain Trainer (``options`` None) or one with the plugin; the logged (loss, grad_norm)
    of each step and the final weights."""
    model = _model(lora, preset)
    args = _args(tmp_path, **kw)
    if options is None:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        weights = model.state_dict()
    else:
        with TiertunePlugin(model, args, options) as plugin:
            trainer = Trainer(
                model=model, args=args, train_dataset=data, optimizers=plugin.optimizers(), callbacks=[plugin]
            )
            trainer.train(resume_from_checkpoint=resume)
            weights = model.state_dict()  # read from the homes
    logs = [(h["step"], h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
    return logs, {k: v.detach().clone() for k, v in weights.items()}


def _assert_same(a, b):
    (logs_a, weights_a), (logs_b, weights_b) = a, b
    assert [s for s, *_ in logs_a] == [s for s, *_ in logs_b]
    assert [x for _, x, _ in logs_b] == pytest.approx([x for _, x, _ in logs_a], rel=RTOL)
    assert [g for *_, g in logs_b] == pytest.approx([g for *_, g in logs_a], rel=RTOL)
    assert weights_a.keys() == weights_b.keys()
    for name, w in weights_a.items():
        torch.testing.assert_close(weights_b[name], w, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_unmodified_trainer_with_the_plugin_trains_as_the_plain_trainer(tmp_path, data, lora):
    plain = _train(tmp_path / "plain", data, lora=lora)
    assert max(g for *_, g in plain[0]) > 0.5  # the clipping was active
    tiered = _train(tmp_path / "tiered", data, NVME, lora=lora)
    _assert_same(plain, tiered)
    assert not (tmp_path / "tiered" / "nvme-store").exists()  # the store went when the plugin closed


def test_a_tied_embedding_and_head_train_as_with_the_plain_trainer(tmp_path, data):
    """GPT-2: the head's gradient kept aside and added into the embedding's, as autograd adds them."""
    plain = _train(tmp_path / "plain", data, preset="tiny-gpt2")
    _assert_same(plain, _train(tmp_path / "tiered", data, NVME, preset="tiny-gpt2"))


def test_a_trainer_checkpoint_resumes_exactly(tmp_path, data):
    """Saved by the Trainer (state_dict of the model and of the optimizer, read from the homes) at step 3,
    resumed into a new plugin (load_state_dict into the homes): the same as the uninterrupted run."""
    whole = _train(tmp_path / "whole", data, NVME)
    _train(tmp_path / "cut", data, NVME, save_strategy="steps", save_steps=3)
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")
    resumed = _train(
        tmp_path / "cut",
        data,
        NVME,
        save_strategy="steps",
        save_steps=3,
        resume=str(tmp_path / "cut" / "checkpoint-3"),
    )
    _assert_same(whole, resumed)


def test_what_the_trainer_plugin_cannot_do_is_refused(tmp_path):
    model = _model()
    with pytest.raises(ConfigError, match="optim.lr: not a placement key; set it in TrainingArguments"):
        TiertunePlugin(model, _args(tmp_path), {"optim.lr": 1e-3})
    with pytest.raises(ConfigError, match="optim.overlap: backward needs to know which backward"):
        TiertunePlugin(model, _args(tmp_path), {"optim.overlap": "backward"})
    with pytest.raises(ConfigError, match="unknown key 'offload.param'"):
        TiertunePlugin(model, _args(tmp_path), {"offload.param": "nvme"})


def test_the_plugin_runs_in_one_process(tmp_path, monkeypatch):
    args = _args(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="for several ranks use `tiertune launch`"):
        TiertunePlugin(_model(), args)


def test_trls_sft_trainer_with_the_plugin_trains_as_without_it(tmp_path):
    """TRL's SFTTrainer (prompt/completion rows, the loss on the completions): a Trainer subclass, so the
    same plugin."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tiertune.launch.datasets import BUILTIN_DATASETS

    examples = BUILTIN_DATASETS["arithmetic"]()[:96]
    rows = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in examples])

    def train(out, options):
        model = build_model(MODEL, seed=0)
        args = SFTConfig(
            output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
            learning_rate=2e-3, max_grad_norm=0.5, logging_steps=1, report_to=[], seed=0, use_cpu=True,
            disable_tqdm=True, save_strategy="no", max_length=64,
        )  # fmt: skip
        extra = {}
        if options is not None:
            plugin = TiertunePlugin(model, args, options)
            extra = {"optimizers": plugin.optimizers(), "callbacks": [plugin]}
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=rows, processing_class=load_tokenizer(MODEL), **extra
        )
        trainer.train()
        if options is not None:
            plugin.close(gather=False)
        return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]

    plain, tiered = train(tmp_path / "plain", None), train(tmp_path / "tiered", NVME)
    assert len(plain) == 4 and max(g for _, g in plain) > 0.5
    assert [x for pair in tiered for x in pair] == pytest.approx(
        [x for pair in plain for x in pair], rel=RTOL
    )


def test_the_example_script_runs(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "hf_trainer.py"), "--steps", "3", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss " in done.stdout and "(step 3)" in done.stdout
