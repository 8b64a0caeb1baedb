import pytest
import torch

from tiertune.config import ModelConfig
from tiertune.errors import ModelError
from tiertune.launch.models import build_model, count_parameters, load_tokenizer
from tiertune.launch.presets import PRESETS
from tiertune.tuning import METHODS, register
from tiertune.tuning.registry import FullTuning

# Parameter counts of the real models whose shapes the presets carry.
KNOWN = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-70b": 68_976_648_192,
    "llama-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "gpt2": 124_439_808,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_without_memory(name):
    model = build_model(ModelConfig(preset=name), seed=0, device="meta")
    assert all(p.is_meta for p in model.parameters())
    if name in KNOWN:
        assert count_parameters(model) == KNOWN[name]
    if name.startswith("tiny-"):
        assert 1e6 < count_parameters(model) < 1e7


def test_preset_init_is_a_function_of_the_seed_only():
    a = build_model(ModelConfig(preset="tiny-llama"), seed=1)
    torch.randn(100)  # the global RNG's state must not matter
    b = build_model(ModelConfig(preset="tiny-llama"), seed=1)
    c = build_model(ModelConfig(preset="tiny-llama"), seed=2)
    pairs = list(zip(a.parameters(), b.parameters()))
    assert all(torch.equal(x, y) for x, y in pairs)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_local_model_directory_round_trips(tmp_path):
    model = build_model(ModelConfig(preset="tiny-gpt2"), seed=0)
    model.save_pretrained(tmp_path)
    load_tokenizer(ModelConfig(preset="tiny-gpt2")).save_pretrained(tmp_path)
    cfg = ModelConfig(path=str(tmp_path))
    loaded = build_model(cfg, seed=123)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), loaded.parameters()))
    assert load_tokenizer(cfg)("hi", add_special_tokens=False)["input_ids"] == [104, 105]
    assert all(p.is_meta for p in build_model(cfg, seed=0, device="meta").parameters())


def test_model_directory_without_tokenizer_is_a_clear_error(tmp_path):
    build_model(ModelConfig(preset="tiny-llama"), seed=0).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no usable tokenizer"):
        load_tokenizer(ModelConfig(path=str(tmp_path)))


def test_a_tuning_method_cannot_be_registered_twice():
    import dataclasses
    import typing

    from tiertune.config.schema import TuningConfig

    # every method the config accepts is registered, and nothing else
    method = next(f for f in dataclasses.fields(TuningConfig) if f.name == "method")
    assert set(METHODS) == set(typing.get_args(typing.get_type_hints(TuningConfig)[method.name]))
    with pytest.raises(ValueError, match="registered twice"):
        register(FullTuning())


def test_damaged_weights_in_a_model_directory_are_a_clear_error(tmp_path):
    build_model(ModelConfig(preset="tiny-llama"), seed=0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot load the model weights.*is the directory complete"):
        build_model(ModelConfig(path=str(tmp_path)), seed=0)
