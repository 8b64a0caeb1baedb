import json
import subprocess
import sys

import pytest
import torch
from conftest import FAST, REPO, fast_config
from safetensors.torch import load_file

from tiertune.errors import CheckpointError, RunDirError
from tiertune.launch.loop import run


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_tiny_llama(tmp_path):
    summary = run(fast_config(tmp_path, "train.max_steps=40", "optim.lr=2e-3", "train.eval_every=40"))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5  # ~ln(260) at first
    assert last < 0.6 * first, (first, last)
    assert summary.eval_loss is not None and summary.eval_loss < 0.6 * first
    for key in ["step", "loss", "lr", "step_time_s", "tokens_per_s", "peak_rss_bytes", "grad_norm"]:
        assert key in rows[0]
    assert (tmp_path / "config.resolved.yaml").is_file() and (tmp_path / "loss.svg").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40


def _weights_after(out, *overrides):
    run(fast_config(out, "train.max_steps=4", "train.checkpoint_every=4", *overrides))
    return load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors")), metrics(out)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_accumulating_2_micro_batches_equals_one_batch_twice_the_size(tmp_path, method):
    # Dropout off: the two runs draw different random numbers for the same rows.
    w_accum, m_accum = _weights_after(
        tmp_path / "a", "train.micro_batch_size=2", "train.grad_accum_steps=2", f"tuning.method={method}"
    )
    w_big, m_big = _weights_after(
        tmp_path / "b", "train.micro_batch_size=4", "train.grad_accum_steps=1", f"tuning.method={method}"
    )
    assert [r["target_tokens"] for r in m_accum] == [r["target_tokens"] for r in m_big]
    for a, b in zip(m_accum, m_big):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert w_accum.keys() == w_big.keys()
    for name in w_accum:  # fp32: equal up to summation order, far below one lr-sized step (1e-3)
        torch.testing.assert_close(w_accum[name], w_big[name], rtol=1e-4, atol=1e-5)


def trajectory(out):
    """The rows of metrics.jsonl without the wall-clock and memory readings."""
    return [
        {k: v for k, v in r.items() if k in ("step", "loss", "lr", "grad_norm", "target_tokens", "eval_loss")}
        for r in metrics(out)
    ]


def _run_killable(out, kill_at, *overrides):
    args = [*FAST, f"output_dir={out}", *overrides]
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "_kill_at_step.py"), str(kill_at), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        "tuning.method=full",
        "tuning.method=lora tuning.lora.dropout=0.1",  # dropout: the RNG state must be restored too
    ],
)
def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, method):
    job = ["train.max_steps=12", "train.checkpoint_every=5", "train.keep_checkpoints=5", *method.split()]
    whole = _run_killable(tmp_path / "whole", 0, *job)
    assert whole.returncode == 0, whole.stderr

    killed = _run_killable(tmp_path / "cut", 8, *job)
    assert killed.returncode == -9, killed.stderr  # died by SIGKILL after step 8, checkpoint at 5
    assert [r["step"] for r in metrics(tmp_path / "cut")][-1] == 8
    resumed = _run_killable(tmp_path / "cut", 0, *job)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 5" in resumed.stderr

    assert trajectory(tmp_path / "cut") == trajectory(tmp_path / "whole")
    for step in (10, 12):
        a = tmp_path / "whole" / "checkpoints" / f"step-{step:08d}"
        b = tmp_path / "cut" / "checkpoints" / f"step-{step:08d}"
        wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        oa, ob = (torch.load(p / "optimizer.pt", weights_only=True)["state"] for p in (a, b))
        assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


def test_resume_continues_to_a_higher_max_steps(tmp_path):
    run(fast_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2"))
    summary = run(fast_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2"))
    assert summary.resumed_from_step == 4 and summary.steps == 6
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    run(fast_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"))
    with pytest.raises(RunDirError, match="already holds checkpoints"):
        run(fast_config(tmp_path, "train.max_steps=2", "train.resume=never"))


def test_resume_refuses_a_checkpoint_of_another_job(tmp_path):
    run(fast_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"))
    with pytest.raises(CheckpointError, match=r"train.seed: 0 -> 1"):
        run(fast_config(tmp_path, "train.max_steps=4", "train.seed=1"))


def test_two_jobs_cannot_share_an_output_dir(tmp_path):
    from tiertune.launch.rundir import RunDir

    holder = RunDir(tmp_path)
    try:
        with pytest.raises(RunDirError, match="in use by another tiertune job"):
            run(fast_config(tmp_path))
    finally:
        holder.close()


def test_lora_trains_only_adapters_and_exports_a_peft_adapter(tmp_path):
    from peft import PeftModel

    from tiertune.config import ModelConfig
    from tiertune.launch.models import build_model

    summary = run(fast_config(tmp_path, "tuning.method=lora", "tuning.lora.r=4", "train.max_steps=3"))
    assert summary.trainable_params < 0.1 * summary.total_params
    base = build_model(ModelConfig(preset="tiny-llama"), seed=0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    trained = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert trained and all("lora_" in k for k in trained)
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained


def test_full_export_is_a_model_directory_a_new_job_can_start_from(tmp_path):
    first = run(fast_config(tmp_path / "a", "train.max_steps=3"))
    again = run(fast_config(tmp_path / "b", f"model.path={tmp_path / 'a' / 'final'}", "train.max_steps=3"))
    # Same seed, so the same first batch: the trained weights must already do better on it.
    assert again.steps == 3 and again.first_loss < first.first_loss


def test_bf16_trains(tmp_path):
    summary = run(fast_config(tmp_path, "train.dtype=bf16", "train.max_steps=3"))
    assert summary.final_loss is not None and summary.final_loss == summary.final_loss


def test_non_finite_gradient_skips_the_step_and_training_goes_on(tmp_path):
    from tiertune.config import OptimConfig
    from tiertune.optim import TorchAdamWUpdater

    p = torch.nn.Parameter(torch.ones(3))
    updater = TorchAdamWUpdater([("w", p)], OptimConfig())
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    report = updater.step(lr=0.1)
    assert report.skipped and torch.equal(p.detach(), torch.ones(3)) and p.grad is None
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    assert not updater.step(lr=0.1).skipped and not torch.equal(p.detach(), torch.ones(3))


def test_exact_match_reports_answers(tmp_path):
    summary = run(fast_config(tmp_path, "train.max_steps=2", "train.eval_exact_match_samples=3"))
    assert summary.exact_match["total"] == 3 and len(summary.exact_match["samples"]) == 3
