import pytest
import torch

from tiertune.config import ModelConfig
from tiertune.launch.models import build_model
from tiertune.offload import find_blocks

FAMILIES = {
    "tiny-llama": "model.layers",
    "tiny-qwen2": "model.layers",
    "tiny-mistral": "model.layers",
    "tiny-gpt2": "transformer.h",
}


@pytest.mark.parametrize("preset, layers", FAMILIES.items())
def test_every_family_cuts_into_embed_layers_head_owning_each_parameter_once(preset, layers):
    model = build_model(ModelConfig(preset=preset), seed=0, device="meta")
    blocks = find_blocks(model)
    assert [b.kind for b in blocks] == ["embed"] + ["layer"] * 4 + ["head"]
    assert [b.name for b in blocks[1:-1]] == [f"{layers}.{i}" for i in range(4)]
    owned = [id(p) for b in blocks for p in b.params.values()]
    assert len(owned) == len(set(owned)) == len(list(model.parameters()))
    assert sum(b.numel for b in blocks) == sum(p.numel() for p in model.parameters())
    assert len({b.numel for b in blocks[1:-1]}) == 1  # identical decoder layers


def test_tied_head_is_recorded_not_counted_twice():
    model = build_model(ModelConfig(preset="tiny-gpt2"), seed=0, device="meta")  # GPT-2 ties wte and lm_head
    head = find_blocks(model)[-1]
    assert head.tied == ["lm_head.weight"]
    assert "transformer.ln_f.weight" in head.params


def test_a_70b_model_is_described_on_meta_without_memory():
    blocks = find_blocks(build_model(ModelConfig(preset="llama-70b"), seed=0, device="meta"))
    assert len(blocks) == 82
    layer = blocks[1]
    # 4 attention projections (q, o: 8192^2; k, v: 8192x1024) + 3 MLP (8192x28672) + 2 norms
    assert layer.numel == 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert layer.nbytes_by_dtype() == {"float32": 4 * layer.numel}


def test_a_model_without_a_layer_list_is_refused():
    from tiertune.errors import ModelError

    with pytest.raises(ModelError, match="cannot cut it into blocks"):
        find_blocks(torch.nn.Linear(2, 2))
