import pytest
from conftest import FAST, REPO, run_cli

from tiertune.launch.cli import main


def test_validate_accepts_an_example(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["validate", "examples/tiny-llama-full.yaml"]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_prints_the_resolved_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["validate", "examples/tiny-llama-full.yaml", "optim.lr=0.005", "--print"]) == 0
    assert "lr: 0.005" in capsys.readouterr().out


def test_a_typo_exits_2_with_a_suggestion(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  max_stpes: 5\n")
    assert main(["validate", str(job), "optim.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "unknown key 'train.max_stpes' (did you mean 'train.max_steps'?)" in err
    assert "optim.lr: expected a finite number, got 'fast'" in err
    assert "Traceback" not in err


def test_train_refuses_a_bad_override_before_doing_anything(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path / 'out'}", "train.max_step=3"]) == 2
    assert "did you mean 'train.max_steps'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_validate_needs_a_file(capsys):
    assert main(["validate", "optim.lr=1"]) == 2
    assert main(["validate", "/no/such.yaml"]) == 2


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        main(["trian"])
    assert info.value.code == 2


def test_keys_and_presets_list_everything(capsys):
    assert main(["keys"]) == 0
    assert "optim.max_grad_norm = 1.0" in capsys.readouterr().out
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "llama-70b" in out and "69.0B" not in out and "68976.6M" in out


@pytest.mark.slow
def test_python_dash_m_trains_and_says_where(tmp_path):
    result = run_cli("train", *FAST, f"output_dir={tmp_path}", "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    assert f"output directory: {tmp_path}" in result.stderr
    assert "done: 3 steps" in result.stdout and str(tmp_path) in result.stdout


@pytest.mark.slow
def test_default_output_dir_is_new_under_runs(tmp_path):
    result = run_cli("train", *FAST, "train.max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.endswith("-tiny-llama-full") and (made / "metrics.jsonl").is_file()


def test_blocks_describes_a_big_model_without_allocating_it(capsys):
    assert main(["blocks", "model.preset=llama-70b"]) == 0
    out = capsys.readouterr().out
    assert "82 blocks" in out and "model.layers.79" in out and "68,976,648,192" in out


def test_probe_measures_the_tiers_and_writes_a_profile(tmp_path, capsys):
    from tiertune.memory.profile import MachineProfile

    out = tmp_path / "profile.json"
    assert (
        main(["probe", "--nvme-dir", str(tmp_path), "--mib", "4", "--repeats", "1", "--out", str(out)]) == 0
    )
    profile = MachineProfile.load(out)
    assert profile.dram_copy_gbps > 0 and profile.cpu_adamw_params_per_s > 0
    assert profile.cpu_adam_kernels["torch"] > 0  # and deepspeed's, where its op compiles
    # the rate planned with is that of the kernel `auto` takes: the fastest, save that DeepSpeed's (whose
    # numbers differ from torch's) must beat an exact one by DEEPSPEED_MARGIN
    from tiertune.optim.kernels import DEEPSPEED_MARGIN

    printed = capsys.readouterr().out
    taken = printed.split("optim.kernel=auto")[1].split()[0]
    assert profile.cpu_adamw_params_per_s == profile.cpu_adam_kernels[taken]
    assert max(profile.cpu_adam_kernels.values()) <= DEEPSPEED_MARGIN * profile.cpu_adamw_params_per_s
    figures = profile.nvme[str(tmp_path)]
    assert set(figures) == {
        f"{rw}_qd{qd}_bs{bs}k" for rw in ("read", "write") for qd in (1, 4, 8) for bs in (128, 1024, 4096)
    }
    assert all(v > 0 for v in figures.values())
    assert f"profile written to {out}" in printed
    assert not list(tmp_path.glob("tiertune-probe-*"))  # its scratch file is gone


def test_probe_refuses_a_missing_directory_and_a_damaged_profile_is_a_clear_error(tmp_path):
    from tiertune.errors import TiertuneError
    from tiertune.memory.profile import MachineProfile

    assert main(["probe", "--nvme-dir", str(tmp_path / "nope")]) == 2
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(TiertuneError, match="run `tiertune probe`"):
        MachineProfile.load(tmp_path / "p.json")


# The plan tests pin everything the machine would otherwise decide: budgets and the machine profile.
PINNED = ["memory.device_budget_gib=16", "memory.host_budget_gib=16", "offload.machine_profile={profile}"]


def _pinned(tmp_path):
    from tiertune.memory.profile import MachineProfile

    profile = tmp_path / "profile.json"
    MachineProfile(
        cpus=2,
        host_total_bytes=2**34,
        dram_copy_gbps=20,
        cpu_adamw_params_per_s=1e9,
        device_tflops=0.2,
        nvme={"d": {"read_qd8_bs1024k": 1.5, "write_qd8_bs1024k": 2.0}},
    ).save(profile)
    return [p.format(profile=profile) for p in PINNED]


def test_plan_prints_the_placement_without_allocating_the_model(tmp_path, capsys):
    assert main(["plan", *_pinned(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0 (+3 like it)" in out and "peak bytes per tier" in out
    assert "predicted step, from the machine profile" in out
    assert main(["plan", "model.preset=llama-70b", "train.dtype=bf16", *_pinned(tmp_path)]) == 2
    assert "memory.device_budget_gib is short by" in capsys.readouterr().err  # 70B of activations alone


def test_plan_honours_a_forced_tier(tmp_path, capsys):
    assert main(["plan", "offload.optimizer=nvme", *_pinned(tmp_path)]) == 0  # tiny-llama: a few MiB on disk
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith(("embed", "model.layers"))
    ]
    assert rows and all(line.split()[-1] == "nvme" for line in rows)


def test_a_profile_with_an_impossible_rate_is_refused(tmp_path):
    import json

    from tiertune.errors import TiertuneError
    from tiertune.memory.profile import MachineProfile

    good = tmp_path / "p.json"
    MachineProfile(
        cpus=2, host_total_bytes=1, dram_copy_gbps=20, cpu_adamw_params_per_s=1e9, device_tflops=0.2
    ).save(good)
    data = json.loads(good.read_text())
    data["device_tflops"] = 0
    good.write_text(json.dumps(data))
    with pytest.raises(TiertuneError, match="zero or negative"):
        MachineProfile.load(good)
