import pytest
import torch

from tiertune.config import ModelConfig
from tiertune.launch.models import build_model
from tiertune.offload.flat import flatten_blocks

IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


def _train(model, steps=3):
    torch.manual_seed(1)  # GPT-2 has dropout: both runs draw the same masks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_flat_blocks_train_exactly_like_the_original(preset):
    plain = build_model(ModelConfig(preset=preset), seed=0)
    flat = build_model(ModelConfig(preset=preset), seed=0)
    params_before = {n: id(p) for n, p in flat.named_parameters()}
    flats = flatten_blocks(flat)
    assert {n: id(p) for n, p in flat.named_parameters()} == params_before  # the same Parameter objects
    assert torch.equal(plain.eval()(input_ids=IDS).logits, flat.eval()(input_ids=IDS).logits)
    plain.train(), flat.train()
    a, b = _train(plain), _train(flat)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert sum(f.buffer.numel() for f in flats) == sum(p.numel() for p in flat.parameters())


def test_every_parameter_is_a_view_of_its_block_buffer_and_one_copy_moves_a_block():
    model = build_model(ModelConfig(preset="tiny-llama"), seed=0)
    flats = flatten_blocks(model)
    assert [f.block for f in flats] == ["embed"] + [f"model.layers.{i}" for i in range(4)] + ["head"]
    params = dict(model.named_parameters())
    for f in flats:
        assert f.buffer.data_ptr() % 4096 == 0
        for name, offset in zip(f.names, f.offsets):
            assert params[name].data_ptr() == f.buffer.data_ptr() + offset * f.buffer.element_size()
    layer = flats[1]
    saved = layer.buffer.clone()  # e.g. a block written to the NVMe store ...
    layer.buffer.zero_()
    assert params["model.layers.0.mlp.up_proj.weight"].abs().sum() == 0
    layer.buffer.copy_(saved)  # ... and read back: every parameter of the block is restored by one copy
    assert torch.equal(
        params["model.layers.0.mlp.up_proj.weight"].flatten(),
        saved[layer.offsets[layer.names.index("model.layers.0.mlp.up_proj.weight")] :][: 256 * 688],
    )


def test_tied_weights_stay_tied():
    model = build_model(ModelConfig(preset="tiny-gpt2"), seed=0)
    flatten_blocks(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_a_flat_block_goes_to_the_nvme_store_and_back_in_one_transfer(tmp_path):
    from tiertune.offload import NvmeStore

    model = build_model(ModelConfig(preset="tiny-llama"), seed=0).eval()
    before = model(input_ids=IDS).logits
    flats = flatten_blocks(model)
    store = NvmeStore([tmp_path], sum(f.slot.numel() for f in flats))
    extents = [store.allocate(f.block, f.nbytes) for f in flats]
    for f, e in zip(flats, extents):
        store.write(e, f.slot).wait()
        f.buffer.fill_(float("nan"))  # the blocks' weights are gone from memory ...
    assert torch.isnan(model(input_ids=IDS).logits).all()
    for f, e in zip(flats, extents):
        store.read(e, f.slot).wait()  # ... and back, one read per block
    assert torch.equal(model(input_ids=IDS).logits, before)
    store.close()
