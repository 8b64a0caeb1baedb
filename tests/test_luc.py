"""LUC: compression, the sensitivity profile, the budget solver, LoRA over a compressed base in a job
(resident and streamed from NVMe), and merging adapters into a full HF model."""

import itertools
import json
import random

import pytest
import torch
from conftest import fast_config, run_cli
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from tiertune.config import load_config
from tiertune.errors import CheckpointError, ConfigError
from tiertune.launch.loop import run
from tiertune.launch.luc_job import POLICY_FILE
from tiertune.launch.models import build_model, skeleton, weight_source
from tiertune.tuning.luc import (
    CompressedLinear,
    InfeasibleBudget,
    Policy,
    Setting,
    compress,
    decompress,
    layout,
    profile,
    solve,
)

# -- compression ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,sparsity", [(b, s) for b in (1, 2, 3, 4, 5, 8) for s in (0.0, 0.3, 0.5)])
def test_compressed_weights_are_within_half_a_step_and_pruned_to_the_smallest(bits, sparsity):
    torch.manual_seed(bits)
    w = torch.randn(48, 200)  # 200 = 3 groups of 64 and a ragged one: padding is exercised
    setting, lay = Setting(bits, sparsity), layout(48, 200, Setting(bits, sparsity), 64)
    packed, meta = compress(w, setting, 64, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (48, lay.row_bytes)
    d = decompress(packed, meta, lay, torch.float32)
    kept = d != 0
    assert (kept.sum(1) == 200 - round(sparsity * 200)).all()  # the same count in every row
    if sparsity:  # the pruned are each row's smallest magnitudes
        smallest_kept = w.abs().masked_fill(~kept, float("inf")).amin(1)
        largest_pruned = w.abs().masked_fill(kept, 0).amax(1)
        assert (largest_pruned <= smallest_kept).all()
    # each kept weight is within half its group's step of the original
    step = meta[..., 0].amax()
    assert (d - w)[kept].abs().max() <= step / 2 + 1e-6
    # and the bytes are the bit width's: b/8 a kept weight (padded to whole groups), a bit of mask a weight
    assert lay.row_bytes == bits * lay.plane_bytes + (25 if sparsity else 0)


def test_a_compressed_linear_computes_with_its_decompressed_weight_and_saves_no_weight_for_backward():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    c = CompressedLinear.from_linear(linear, Setting(3), 32)
    x = torch.randn(4, 7, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = c(x)
    weight = c.weight
    torch.testing.assert_close(y, x @ weight.t() + linear.bias, rtol=0, atol=1e-5)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(g, (2 * y) @ weight, rtol=1e-5, atol=1e-5)
    # backward keeps the packed codes and their scales: under a quarter of the fp32 weight's bytes
    assert sum(t.nbytes for t in saved) < weight.nbytes / 4
    assert {t.dtype for t in saved} <= {torch.uint8, torch.float32}
    assert not any(t.shape == weight.shape for t in saved)


# -- the solver ------------------------------------------------------------------------------------------


def _instance(seed, layers=4):
    rng = random.Random(seed)
    options = [Setting(b, s) for b in (2, 3, 4, 8) for s in (0.0, 0.25, 0.5)]
    params = {f"l{i}": rng.choice([1000, 1000, 2000]) for i in range(layers)}
    errors = {}
    for n in params:
        sens = rng.uniform(0.1, 10)
        errors[n] = {s: sens * (2.0**-s.bits + s.sparsity**2) for s in options}
    return errors, params


def _brute(errors, params, ok):
    names = list(errors)
    best = None
    for combo in itertools.product(*(list(errors[n]) for n in names)):
        pick = dict(zip(names, combo))
        if ok(pick):
            cost = sum(errors[n][pick[n]] for n in names)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_solver_meets_the_budget_at_the_least_total_error(seed):
    errors, params = _instance(seed)
    total = sum(params.values())
    avg_bits, sparsity = random.Random(seed).choice([(3.0, 0.25), (4.0, 0.0), (2.5, 0.1), (5.0, 0.4)])
    pick = solve(errors, params, avg_bits=avg_bits, sparsity=sparsity)
    assert sum(params[n] * s.bits for n, s in pick.items()) <= avg_bits * total + 1e-9
    assert sum(params[n] * s.sparsity for n, s in pick.items()) >= sparsity * total - 1e-9

    def ok(p):
        return (
            sum(params[n] * s.bits for n, s in p.items()) <= avg_bits * total + 1e-9
            and sum(params[n] * s.sparsity for n, s in p.items()) >= sparsity * total - 1e-9
        )

    assert sum(errors[n][s] for n, s in pick.items()) == pytest.approx(_brute(errors, params, ok))


def test_the_solver_meets_a_byte_budget_and_compresses_the_least_sensitive_layers_hardest():
    options = [Setting(b) for b in (2, 3, 4, 8)]
    sensitivity = {"a": 8.0, "b": 1.0, "c": 4.0, "d": 0.5}
    errors = {n: {s: k * 2.0**-s.bits for s in options} for n, k in sensitivity.items()}
    params = dict.fromkeys(sensitivity, 1000)
    pick = solve(errors, params, avg_bits=4.0)
    order = sorted(
        sensitivity, key=sensitivity.get
    )  # least sensitive first: never more bits than a more sensitive
    assert [pick[n].bits for n in order] == sorted(pick[n].bits for n in order)
    assert pick["d"].bits < pick["a"].bits
    cap = 1700  # bytes: each layer's bytes are bits/8 x params here

    def stored(n, s):
        return s.bits * params[n] // 8

    by_bytes = solve(errors, params, avg_bits=None, max_bytes=cap, stored_bytes=stored)
    assert sum(stored(n, s) for n, s in by_bytes.items()) <= cap
    with pytest.raises(InfeasibleBudget):
        solve(errors, params, avg_bits=1.5)
    with pytest.raises(InfeasibleBudget):
        solve(errors, params, avg_bits=4.0, sparsity=0.1)  # no pruned option allowed


def test_a_policy_round_trips_through_json():
    p = Policy(64, {"m.0": Setting(3, 0.25), "m.1": Setting(8)}, {"m.0": 10, "m.1": 10}, {"m.0": {"3b": 0.1}})
    q = Policy.from_json(p.to_json())
    assert q.layers == p.layers and q.params == p.params and q.errors == p.errors
    assert q.avg_bits == 5.5 and q.sparsity == 0.125


# -- the sensitivity profile -----------------------------------------------------------------------------


def test_the_profile_walks_a_meta_model_layer_by_layer_and_measures_what_the_whole_model_shows():
    cfg = load_config(None, ["model.preset=tiny-llama"])
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    options = [Setting(2), Setting(4), Setting(8), Setting(4, 0.5)]
    meta = skeleton(cfg.model)
    source = weight_source(cfg.model, 0, meta)
    most = [0]

    def fill(name, tensor):  # how many layers hold real weights at once
        source(name, tensor)
        made = {n.split(".")[2] for n, p in meta.named_parameters() if ".layers." in n and not p.is_meta}
        most[0] = max(most[0], len(made))

    measured = profile(meta, fill, [ids], options, group_size=64)
    assert most[0] == 1  # one layer's weights at a time
    for per in measured.errors.values():  # fewer bits or more pruning: more error
        assert per[Setting(2)] > per[Setting(4)] > per[Setting(8)] > 0
        assert per[Setting(4, 0.5)] > per[Setting(4)]
    # the same figure from two whole models, one with layer 1's linears compressed
    exact = build_model(cfg.model, seed=0)
    for setting in (Setting(2), Setting(4, 0.5)):
        changed = build_model(cfg.model, seed=0)
        for m in changed.model.layers[1].modules():
            if isinstance(m, nn.Linear):
                lay = layout(*m.weight.shape, setting, 64)
                m.weight.data = decompress(
                    *compress(m.weight, setting, 64, torch.float32), lay, torch.float32
                )
        with torch.no_grad():
            a = exact(ids, output_hidden_states=True).hidden_states[2]  # layer 1's output
            b = changed(ids, output_hidden_states=True).hidden_states[2]
        want = float((b - a).pow(2).sum() / a.pow(2).sum())
        assert measured.errors["model.layers.1"][setting] == pytest.approx(want, rel=1e-4)


# -- in a job --------------------------------------------------------------------------------------------

LUC = ["tuning.method=luc_lora", "tuning.luc.calibration_batches=2", "tuning.luc.group_size=32"]


def _adapters(out):
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def test_lora_over_a_compressed_base_trains_the_same_resident_and_from_nvme(tmp_path):
    resident = run(fast_config(tmp_path / "resident", *LUC, "tuning.luc.avg_bits=3"))
    streamed = run(
        fast_config(
            tmp_path / "nvme", *LUC, "tuning.luc.avg_bits=3", "offload.params=nvme", "offload.optimizer=nvme"
        )
    )
    assert streamed.memory["peak_bytes"].get("nvme", 0) > 0
    rows = [json.loads(x) for x in (tmp_path / "resident" / "metrics.jsonl").read_text().splitlines()]
    rows_nvme = [json.loads(x) for x in (tmp_path / "nvme" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_nvme]  # bit for bit
    a, b = _adapters(tmp_path / "resident"), _adapters(tmp_path / "nvme")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resident.final_loss < resident.first_loss
    policy = Policy.from_json((tmp_path / "nvme" / POLICY_FILE).read_text())
    assert policy.avg_bits <= 3.0 and (tmp_path / "nvme" / "final" / POLICY_FILE).is_file()


def test_the_streamed_base_is_stored_and_moved_compressed(tmp_path):
    read = {}

    def base_on_nvme(name, *overrides):
        summary = run(
            fast_config(
                tmp_path / name, *overrides, "offload.params=nvme", "train.max_steps=2", "train.dtype=bf16"
            )
        )
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        read[name] = rows[-1]["nvme_bytes"]["read"]["frozen params"]  # what a step reads of the base
        return summary.memory["bytes"]["nvme"]["params"]

    lora = base_on_nvme("lora", "tuning.method=lora")
    luc = base_on_nvme("luc", *LUC[:2], "tuning.luc.avg_bits=4", "tuning.luc.group_size=128")
    # and moves them so: a step reads the same blocks of the base either way, compressed in one
    assert read["luc"] <= 0.33 * read["lora"], read
    policy = Policy.from_json((tmp_path / "luc" / POLICY_FILE).read_text())
    # The drive holds (and each step reads) the same embedding, head, norms and adapters either way; the
    # layers' linears, 16-bit in one run, take at most 0.3x those bytes in the other: 4-bit codes and two
    # bf16 numbers per 128 weights (0.266x, more where a row's last group is padded), and a 4 KiB-aligned flat more per layer.
    linears_luc = luc - (lora - policy.dense_bytes)
    assert linears_luc <= 0.3 * policy.dense_bytes + 4 * 4096, (luc, lora, policy.dense_bytes)
    assert policy.stored_bytes <= 0.3 * policy.dense_bytes  # 0.273x: down_proj's 688 inputs pad to 768


def test_a_resumed_luc_run_reuses_its_policy_and_a_named_policy_is_used_as_it_is(tmp_path):
    out = tmp_path / "run"
    run(fast_config(out, *LUC, "train.max_steps=4", "train.checkpoint_every=2"))
    saved = (out / POLICY_FILE).read_text()
    policy = Policy.from_json(saved)
    edited = Policy(policy.group_size, dict.fromkeys(policy.layers, Setting(8)), policy.params)
    (tmp_path / "eight.json").write_text(edited.to_json())
    other = run(fast_config(tmp_path / "named", *LUC, f"tuning.luc.policy={tmp_path / 'eight.json'}"))
    assert Policy.from_json((tmp_path / "named" / POLICY_FILE).read_text()).layers == edited.layers
    assert other.final_loss is not None
    # resuming with another policy would put the adapters over another base: refused
    with pytest.raises((CheckpointError, ConfigError), match="luc"):
        run(fast_config(out, *LUC, "train.max_steps=6", f"tuning.luc.policy={tmp_path / 'eight.json'}"))
    assert (out / POLICY_FILE).read_text() == saved  # the run's own policy is untouched
    run(fast_config(out, *LUC, "train.max_steps=6", "train.checkpoint_every=2"))  # resumes with its own


def test_an_impossible_budget_says_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="raise tuning.luc.avg_bits"):
        run(fast_config(tmp_path, *LUC, "tuning.luc.avg_bits=1.5"))


@pytest.mark.parametrize("method", ["lora", "luc_lora"])
def test_merged_export_is_the_trained_model(tmp_path, method):
    out = tmp_path / method
    extra = LUC[1:] if method == "luc_lora" else []
    run(
        fast_config(
            out, f"tuning.method={method}", *extra, "tuning.lora.export_merged=true", "train.max_steps=3"
        )
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged", local_files_only=True)
    # the trained model, rebuilt whole: base (compressed as trained) + the exported adapters
    cfg = load_config(out / "config.resolved.yaml")
    from peft import PeftModel

    trained = PeftModel.from_pretrained(build_model(cfg.model, seed=cfg.train.seed), out / "final")
    if method == "luc_lora":  # as the job does it: the adapters' base layers compressed beneath them
        from tiertune.tuning.luc import compress_layers

        compress_layers(trained, Policy.from_json((out / POLICY_FILE).read_text()), torch.float32)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # and `tiertune merge` writes the same file from the run directory
    done = run_cli("merge", str(out), "--out", str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        out / "final" / "merged" / "model.safetensors"
    ).read_bytes()


def test_plan_prints_the_policy(tmp_path):
    done = run_cli("plan", *LUC, "data.seq_len=64", "--save-policy", str(tmp_path / "p.json"))
    assert done.returncode == 0, done.stderr
    assert "LUC policy" in done.stdout and "model.layers.3" in done.stdout
    assert Policy.from_json((tmp_path / "p.json").read_text()).avg_bits <= 4.0
