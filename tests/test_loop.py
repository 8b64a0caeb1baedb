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
    # fp32: equal up to summation order, which Adam's normalised update magnifies where a gradient is
    # near zero (observed up to 1.7e-5 on one LoRA element after 4 steps): within 5% of one lr step (1e-3).
    for name in w_accum:
        torch.testing.assert_close(w_accum[name], w_big[name], rtol=1e-4, atol=5e-5)


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
        # weights and optimizer state on NVMe: the store left by the killed run is replaced on resume
        "tuning.method=full offload.params=nvme offload.optimizer=nvme",
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
        assert oa.keys() == ob.keys() and len(oa) > 0
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


def test_bf16_trains_close_to_fp32_but_not_identically(tmp_path):
    fp32 = run(fast_config(tmp_path / "fp32", "train.max_steps=3"))
    bf16 = run(fast_config(tmp_path / "bf16", "train.dtype=bf16", "train.max_steps=3"))
    losses = [[r["loss"] for r in metrics(tmp_path / d)] for d in ("fp32", "bf16")]
    assert losses[0] != losses[1]  # the matmuls really ran in bf16
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert bf16.final_loss == pytest.approx(fp32.final_loss, rel=2e-2)


def test_a_non_finite_gradient_skips_that_step_and_training_goes_on(tmp_path, monkeypatch):
    import tiertune.launch.loop as loop

    build_engine = loop.build_engine
    backwards = {"n": 0}

    def poison_third_backward(cfg, model, *args, **kwargs):
        def hook(grad):
            backwards["n"] += 1
            return grad * float("inf") if backwards["n"] == 3 else grad

        engine = build_engine(cfg, model, *args, **kwargs)  # the engine makes the parameters
        next(p for p in engine.model.parameters() if p.requires_grad).register_hook(hook)
        return engine

    monkeypatch.setattr(loop, "build_engine", poison_third_backward)
    summary = run(
        fast_config(tmp_path, "train.max_steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=10")
    )
    rows = metrics(tmp_path)
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False]
    assert rows[2]["grad_norm"] is None  # inf, written as JSON null
    assert summary.skipped_steps == 1 and summary.steps == 5
    ckpts = tmp_path / "checkpoints"
    before, after, last = (
        load_file(str(ckpts / f"step-{s:08d}" / "trainable.safetensors")) for s in (2, 3, 5)
    )
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing moved
    assert all(torch.isfinite(t).all() for t in last.values())
    assert not all(torch.equal(after[k], last[k]) for k in last)  # and training went on


def test_steps_whose_rows_carry_no_loss_are_skipped_not_applied(tmp_path):
    data = tmp_path / "long-prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p" * 60, "completion": " x"}) + "\n" for _ in range(40)))
    out = tmp_path / "run"
    summary = run(
        fast_config(
            out,
            f"data.path={data}",
            "data.seq_len=16",
            "train.micro_batch_size=1",
            "train.max_steps=6",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=10",
        )
    )
    rows = metrics(out)
    empty = [r["step"] for r in rows if r["target_tokens"] == 0]
    assert empty and summary.skipped_steps == len(empty)
    for r in rows:
        assert (r["loss"] is None) == (r["step"] in empty) and r.get("skipped", False) == (r["step"] in empty)
    step = next(s for s in empty if s > 1)
    before, after = (
        load_file(str(out / "checkpoints" / f"step-{s:08d}" / "trainable.safetensors"))
        for s in (step - 1, step)
    )
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_no_eval_split_trains_without_eval(tmp_path):
    summary = run(fast_config(tmp_path, "data.eval_fraction=0", "train.max_steps=2", "train.eval_every=1"))
    assert summary.eval_loss is None and all("eval_loss" not in r for r in metrics(tmp_path))


def test_resume_applies_the_new_optimizer_settings(tmp_path):
    from tiertune.launch import resume
    from tiertune.launch.engine import build_engine
    from tiertune.launch.models import build_model

    run(fast_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"))
    cfg = fast_config(
        tmp_path, "train.max_steps=4", "optim.weight_decay=0.1", "optim.betas=[0.5, 0.6]", "optim.eps=1e-6"
    )
    engine = build_engine(cfg, build_model(cfg.model, seed=0), torch.device("cpu"))
    engine.load(resume.find_resume_point(cfg, tmp_path).path)
    groups = engine.updater.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.5, 0.6) and g["eps"] == 1e-6 for g in groups)


def test_a_finished_run_without_checkpoints_is_never_overwritten(tmp_path):
    run(fast_config(tmp_path, "train.max_steps=2"))  # checkpoint_every=0: results, no checkpoint
    saved = (tmp_path / "metrics.jsonl").read_text()
    for policy in ("auto", "never"):
        with pytest.raises(RunDirError, match="results of a finished run"):
            run(fast_config(tmp_path, "train.max_steps=2", f"train.resume={policy}"))
    assert (tmp_path / "metrics.jsonl").read_text() == saved


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    killed = _run_killable(tmp_path, 2, "train.max_steps=4", "train.checkpoint_every=3")
    assert killed.returncode == -9
    summary = run(fast_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=3"))
    assert summary.resumed_from_step == 0 and [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]


def test_resume_refuses_when_the_training_data_changed(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " * 5}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    run(fast_config(out, f"data.path={data}", "train.max_steps=2", "train.checkpoint_every=2"))
    with data.open("a") as f:
        f.write(json.dumps({"text": "one more row"}) + "\n")
    with pytest.raises(CheckpointError, match="the training data changed"):
        run(fast_config(out, f"data.path={data}", "train.max_steps=4", "train.checkpoint_every=2"))


@pytest.mark.cuda
def test_cuda_trains_like_cpu(tmp_path):
    cpu = run(fast_config(tmp_path / "cpu", "train.device=cpu", "train.max_steps=3"))
    gpu = run(fast_config(tmp_path / "gpu", "train.device=cuda", "train.max_steps=3"))
    assert gpu.peak_device_bytes and gpu.final_loss == pytest.approx(cpu.final_loss, rel=1e-3)


def test_exact_match_reports_answers(tmp_path):
    summary = run(fast_config(tmp_path, "train.max_steps=2", "train.eval_exact_match_samples=3"))
    assert summary.exact_match["total"] == 3 and len(summary.exact_match["samples"]) == 3
