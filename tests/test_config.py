from pathlib import Path

import pytest
import yaml

from tiertune.config import JobConfig, dump_config, iter_keys, load_config
from tiertune.errors import ConfigError
from tiertune.tuning import METHODS

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml")) + sorted((REPO / "examples").glob("*.toml"))


def problems_of(path=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid_and_pick_tiny_llama():
    cfg = load_config()
    assert cfg.model.preset == "tiny-llama"
    assert cfg.data.path == "builtin:arithmetic"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(example, monkeypatch):
    monkeypatch.chdir(REPO)  # examples name their data files relative to the repository root
    assert isinstance(load_config(example), JobConfig)


def test_examples_exist():
    assert len(EXAMPLES) >= 3


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.001\ntrian:\n  max_steps: 3\n")
    problems = problems_of(path)
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in problems
    assert "unknown key 'trian' (did you mean 'train'?)" in problems


def test_key_in_the_wrong_section_is_pointed_to_its_home():
    (problem,) = problems_of(None, ["train.lr=0.1"])
    assert "did you mean 'optim.lr'?" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "train:\n  max_steps: ten\n  dtype: fp16\n  micro_batch_size: -2\n"
        "optim:\n  lr: true\n  betas: [0.9]\nmodel:\n  prest: x\n",
    )
    problems = problems_of(path)
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    assert "train.max_steps: expected an integer, got 'ten' (str)" in text
    assert "train.dtype: 'fp16' is not allowed; choose one of: fp32, bf16" in text
    assert "train.micro_batch_size: -2 must be > 0" in text
    assert "optim.lr: expected a finite number, got True (bool)" in text
    assert "optim.betas" in text
    assert "unknown key 'model.prest' (did you mean 'model.preset'?)" in text


def test_overrides_beat_the_file_and_later_overrides_win(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.01\ntrain:\n  max_steps: 5\n  seed: 3\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.max_steps=20", "train.max_steps=30"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 30
    assert cfg.train.seed == 3  # from the file
    assert cfg.train.micro_batch_size == JobConfig().train.micro_batch_size  # the default


def test_yaml_reads_3e_minus_4_as_a_number(tmp_path):
    # YAML 1.1 reads '3e-4' as a string; a float field must still take it.
    assert load_config(write(tmp_path, "optim:\n  lr: 3e-4\n")).optim.lr == pytest.approx(3e-4)


def test_toml_and_yaml_give_the_same_config(tmp_path):
    y = load_config(write(tmp_path, "train:\n  max_steps: 70\ntuning:\n  method: lora\n  lora:\n    r: 4\n"))
    t = load_config(
        write(
            tmp_path, "[train]\nmax_steps = 70\n[tuning]\nmethod = 'lora'\n[tuning.lora]\nr = 4\n", "job.toml"
        )
    )
    assert y == t


def test_list_overrides():
    cfg = load_config(None, ["tuning.lora.target_modules=q_proj,v_proj", "optim.betas=[0.8, 0.9]"])
    assert cfg.tuning.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.betas == [0.8, 0.9]


def test_none_override_clears_an_optional_key(tmp_path):
    path = write(tmp_path, "output_dir: somewhere\n")
    assert load_config(path).output_dir == "somewhere"
    assert load_config(path, ["output_dir=null"]).output_dir is None


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("train.warmup_steps=5", "'optim.warmup_steps'"),  # not the fuzzy sibling train.max_steps
        ("optim.max_steps=100", "'train.max_steps'"),  # not the fuzzy sibling optim.warmup_steps
        ("path=x", "'model.path' or 'data.path'"),
    ],
)
def test_a_key_in_another_section_is_sent_home_not_to_a_lookalike(key, suggestion):
    (problem,) = problems_of(None, [key])
    assert f"did you mean {suggestion}?" in problem


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=1e400", "optim.eps=nan"])
def test_non_finite_numbers_are_refused(override):
    (problem,) = problems_of(None, [override])
    assert "expected a finite number" in problem


@pytest.mark.parametrize("override", ["optim.betas=[0.8,", "tuning.lora.target_modules=[q_proj"])
def test_a_malformed_list_override_is_a_problem_not_a_crash(override):
    (problem,) = problems_of(None, [override])
    assert "expected a list" in problem


def test_yaml_booleans_and_stray_spaces_still_name_their_choice(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  progress: off\n"), ["train.dtype= bf16"])
    assert cfg.train.progress == "off" and cfg.train.dtype == "bf16"


def test_an_empty_section_is_allowed(tmp_path):
    assert load_config(write(tmp_path, "train:\n  # max_steps: 10\noptim:\n")) == load_config()


def test_warmup_defaults_to_a_share_of_the_run():
    assert load_config(None, ["train.max_steps=400"]).optim.warmup_steps == 20
    assert load_config(None, ["train.max_steps=5"]).optim.warmup_steps == 0  # short runs just work


def test_type_errors_and_file_checks_are_reported_together(tmp_path):
    path = write(tmp_path, "train:\n  max_stpes: 5\ndata:\n  path: /no/such.jsonl\n")
    problems = problems_of(path, ["train.seed=-1"])
    assert len(problems) == 3, problems
    assert any("does not exist" in p for p in problems)
    assert any("train.seed: -1 must be between 0 and 2**32 - 1" in p for p in problems)


def test_an_unreadable_config_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"train:\n  seed: \xff\xfe\n")
    assert "cannot read the config file" in problems_of(path)[0]


def test_the_loader_coerces_bools_optionals_and_lists_for_any_schema():
    from dataclasses import dataclass, field

    from tiertune.config.loader import build_dataclass, parse_overrides

    @dataclass
    class Section:
        flag: bool = False
        limit: int | None = 3
        names: list[str] = field(default_factory=list)

    tree, problems = parse_overrides(["flag=yes", "limit=none", "names=a, b"])
    section, build_problems = build_dataclass(Section, tree)
    assert not problems and not build_problems
    assert section == Section(flag=True, limit=None, names=["a", "b"])
    _, bad = build_dataclass(Section, {"flag": "maybe", "limit": 2.5, "names": "x"})
    assert bad == [
        "flag: expected true or false, got 'maybe' (str)",
        "limit: expected an integer, got 2.5 (float)",
        "names: expected a list of str, got 'x' (str)",
    ]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainmax_steps", "is not of the form dotted.key=value"),
        ("train=3", "train is a section"),
        ("model.preset=tiny-lama", "did you mean 'tiny-llama'?"),
        ("data.path=/no/such/file.jsonl", "does not exist"),
        ("data.path=builtin:nope", "is not a built-in dataset"),
        ("model.path=/no/such/dir", "is not a directory"),
        ("train.resume=always", "choose one of: auto, never"),
        ("optim.warmup_steps=500", "more than train.max_steps"),
        ("data.eval_fraction=0.9", "must be between 0.0 and 0.5"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, fragment):
    problems = problems_of(None, [override])
    assert any(fragment in p for p in problems), problems


def test_preset_and_path_together_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    problems = problems_of(None, ["model.preset=tiny-llama", f"model.path={tmp_path}"])
    assert any("set exactly one" in p for p in problems)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train: [1, 2\n", "not valid YAML at line"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("train: 5\n", "train: expected a mapping of keys"),
    ],
)
def test_malformed_files(tmp_path, text, fragment):
    problems = problems_of(write(tmp_path, text))
    assert any(fragment in p for p in problems), problems


def test_missing_config_file():
    assert "does not exist" in problems_of("/no/such/job.yaml")[0]


def test_resolved_config_round_trips():
    cfg = load_config(None, ["optim.lr=0.002", "tuning.method=lora"])
    again = yaml.safe_load(dump_config(cfg))
    assert again["optim"]["lr"] == 0.002 and again["tuning"]["method"] == "lora"


def test_every_key_has_help_and_schema_matches_the_method_registry():
    keys = list(iter_keys())
    assert all(help_text for _, _, help_text in keys)
    names = {k for k, _, _ in keys}
    for required in [
        "model.preset",
        "model.path",
        "data.path",
        "data.seq_len",
        "tuning.method",
        "train.max_steps",
        "train.micro_batch_size",
        "train.grad_accum_steps",
        "train.seed",
        "train.checkpoint_every",
        "train.resume",
        "train.dtype",
        "optim.lr",
        "optim.weight_decay",
        "optim.max_grad_norm",
        "output_dir",
    ]:
        assert required in names
    import typing

    from tiertune.config.schema import TuningConfig

    allowed = set(typing.get_args(typing.get_type_hints(TuningConfig)["method"]))
    assert allowed == set(METHODS)


def test_a_sequence_longer_than_the_model_positions_is_refused():
    (problem,) = problems_of(None, ["model.preset=tiny-gpt2", "data.seq_len=2048"])
    assert problem == "data.seq_len: 2048 is longer than the model's 1024 positions; lower it to at most 1024"


def test_budgets_take_a_number_or_auto():
    cfg = load_config(None, ["memory.host_budget_gib=8", "memory.cxl_nodes=2,3"])
    assert cfg.memory.host_budget_gib == 8.0 and cfg.memory.cxl_nodes == [2, 3]
    assert cfg.memory.device_budget_gib == "auto"
    problems = problems_of(
        None, ["memory.host_budget_gib=lots", "memory.cxl_budget_gib=-1", "memory.cxl_nodes=x"]
    )
    assert problems == [
        "memory.host_budget_gib: expected a finite number or 'auto', got 'lots'",
        "memory.cxl_budget_gib: -1.0 must be >= 0 GiB, or auto",
        "memory.cxl_nodes: expected a list of int or 'auto', got 'x'",
    ]
