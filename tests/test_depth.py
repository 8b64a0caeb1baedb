"""Adaptive depth: the vote, the schedule, what a window's step runs and trains, exit heads that really
train, and a depth job streamed from NVMe against the same job resident and plain PyTorch."""

import json
import math

import pytest
import torch
from conftest import fast_config
from reference import reference_run
from safetensors.torch import load_file
from torch.nn import functional as F

from tiertune.config import load_config
from tiertune.errors import ConfigError
from tiertune.launch.loop import run
from tiertune.launch.models import build_model
from tiertune.tuning import get_method
from tiertune.tuning.depth import EXITS_FILE, controller_of, load_exits, vote

# -- the vote --------------------------------------------------------------------------------------------


def test_max_confidence_takes_each_position_from_the_exit_surest_of_itself():
    a = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]]])  # sure of token 0 / unsure
    b = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]]])  # unsure / sure of token 2
    voted = vote([a, b], "max_confidence")
    assert torch.equal(voted[0, 0], a[0, 0]) and torch.equal(voted[0, 1], b[0, 1])
    assert voted.argmax(-1).tolist() == [[0, 2]]


def test_mean_probs_is_the_log_of_the_averaged_distributions():
    torch.manual_seed(0)
    exits = [torch.randn(2, 3, 7) for _ in range(3)]
    voted = vote(exits, "mean_probs")
    mixture = sum(F.softmax(e, -1) for e in exits) / 3
    torch.testing.assert_close(voted.exp(), mixture)
    # so cross-entropy of the vote is the mixture's negative log-likelihood
    target = torch.tensor([[1, 2, 3], [4, 5, 6]])
    nll = -mixture.gather(-1, target[..., None]).log().mean()
    torch.testing.assert_close(F.cross_entropy(voted.flatten(0, 1), target.flatten()), nll)


# -- a window's step ------------------------------------------------------------------------------------

DEPTH = [
    "tuning.method=depth",
    "tuning.depth.exits=[1, 2]",
]  # tiny-llama: 4 layers, windows [0,1) [1,2) [2,4)


def _depth_model(*overrides):
    cfg = load_config(None, ["model.preset=tiny-llama", *DEPTH, *overrides])
    model = get_method("depth").apply(build_model(cfg.model, seed=0), cfg.tuning)
    return model, controller_of(model)


def test_the_schedule_turns_windows_in_order_or_by_seed():
    _, c = _depth_model("tuning.depth.steps_per_window=2")
    assert c.exits == [1, 2, 4]
    assert [c.window_for(s) for s in range(1, 9)] == [0, 0, 1, 1, 2, 2, 0, 0]
    _, r = _depth_model("tuning.depth.schedule=random", "tuning.depth.seed=3")
    draws = [r.window_for(s) for s in range(1, 61)]
    assert set(draws) == {0, 1, 2} and draws == [r.window_for(s) for s in range(1, 61)]


@pytest.mark.parametrize("window", [0, 1, 2])
def test_a_step_runs_no_layer_above_its_window_and_saves_nothing_below_it(window):
    model, c = _depth_model()
    base = model.get_base_model()
    layers = base.model.layers
    runs = [0] * 4
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
    saved_by = [0] * 4
    current = [None]
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        if current[0] is not None:
            saved_by[current[0]] += 1
        return t

    model.train()
    c.begin_step(window + 1)  # round robin: step k+1 trains window k
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits
    logits.float().logsumexp(-1).mean().backward()
    first, end = c.bounds(window)
    assert runs == [1 if i < end else 0 for i in range(4)]  # above the window: not run
    assert all(saved_by[i] == 0 for i in range(first)) and all(saved_by[i] > 0 for i in range(first, end))
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = int(n.split("layers.")[1].split(".")[0]) if "layers." in n else None
        in_window = layer is not None and first <= layer < end
        own_exit = f"exits.{window}." in n
        assert (n in graded) == (in_window or own_exit), n
    assert base.config.num_hidden_layers == 4  # the forward restored the model's depth
    assert torch.is_grad_enabled()


def test_evaluation_votes_and_scores_every_exit():
    model, c = _depth_model()
    model.eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    exits = c._exit_logits
    assert len(exits) == 3
    assert c.vote == "fitted" and c.weights is None  # the default, before any fit: equal weights
    torch.testing.assert_close(logits, vote(exits, "mean_probs"))
    labels = ids.clone()
    c.score(labels)
    m = c.metrics()
    assert set(m) == {"exit@1", "exit@2", "exit@4", "vote"}
    want = F.cross_entropy(exits[1][:, :-1].flatten(0, 1), labels[:, 1:].flatten()).item()
    assert m["exit@2"]["loss"] == pytest.approx(want, rel=1e-6)
    assert all(0 <= v["accuracy"] <= 1 for v in m.values())


def test_the_fitted_vote_weighs_exits_by_the_likelihood_of_the_calibration_targets():
    """EM finds the maximum-likelihood mixture: on targets that one exit predicts well and the others
    badly, that exit takes (nearly) all the weight, and the vote's loss is at most the best exit's."""
    model, c = _depth_model()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 16), generator=gen)
    with torch.no_grad():
        model(input_ids=ids)
    # make exit@2 a good predictor of these targets: its logits put most mass on each next token
    good = c._exit_logits[1].clone()
    good[:, :-1].scatter_add_(-1, ids[:, 1:, None], torch.full((4, 15, 1), 8.0))
    c._exit_logits[1] = good
    exits = list(c._exit_logits)
    c.calibrate(ids)
    weights = c.fit()
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0)
    assert weights[1] > 0.9, weights
    voted = vote(exits, "fitted", weights)
    torch.testing.assert_close(voted.exp().sum(-1), torch.ones(4, 16))  # log-probabilities of a mixture
    nll = lambda lg: F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()  # noqa: E731
    assert nll(voted) <= min(nll(e) for e in exits) + 1e-6
    assert nll(voted) < nll(vote(exits, "mean_probs"))


def test_bad_exits_are_refused_with_the_layer_count():
    with pytest.raises(ConfigError, match="between 1 and 3"):
        _depth_model("tuning.depth.exits=[2, 4]")
    with pytest.raises(ConfigError, match="increasing"):
        load_config(None, ["tuning.depth.exits=[2, 1]"])


# -- in a job --------------------------------------------------------------------------------------------

JOB = [*DEPTH, "train.max_steps=6", "optim.lr=5e-3", "train.checkpoint_every=6"]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _trained(out):
    return load_file(str(out / "checkpoints" / "step-00000006" / "trainable.safetensors"))


def test_a_depth_job_streamed_from_nvme_equals_it_resident_and_plain_pytorch(tmp_path):
    # Adam's eps 1e-6 (BERT's) as in test_classification: with 1e-8, an element whose gradient is rounding
    # noise (a near-cancellation, here in a LoRA B under peft 0.21's initialisation) gets an lr-sized step
    # of either sign, which compares implementations' rounding, not their arithmetic
    job = [*JOB, "optim.eps=1e-6"]
    run(fast_config(tmp_path / "resident", *job))
    summary = run(fast_config(tmp_path / "nvme", *job, "offload.params=nvme", "offload.optimizer=nvme"))
    assert summary.memory["peak_bytes"].get("nvme", 0) > 0
    assert _losses(tmp_path / "resident") == _losses(tmp_path / "nvme")  # bit for bit
    a, b = _trained(tmp_path / "resident"), _trained(tmp_path / "nvme")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ref_losses, ref_weights = reference_run(fast_config(tmp_path / "reference", *job))
    assert _losses(tmp_path / "nvme") == pytest.approx(ref_losses, rel=1e-5)
    assert ref_weights.keys() == b.keys()
    # fp32, fused AdamW against the for-loop one: equal up to rounding, which Adam's normalised update
    # magnifies where a gradient is near zero (observed: one element of 1024 off by 6e-5, 1.2% of one
    # lr=5e-3 step): within 5% of one step
    for n, w in ref_weights.items():
        torch.testing.assert_close(b[n], w, rtol=0, atol=0.05 * 5e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_exit_heads_train_and_are_exported_with_per_exit_metrics(tmp_path):
    out = tmp_path / "run"
    summary = run(fast_config(out, *JOB, "train.eval_every=3"))
    exported = load_file(str(out / "final" / EXITS_FILE))
    original = build_model(load_config(None, ["model.preset=tiny-llama"]).model, seed=0)
    head = original.lm_head.weight
    copies = [n for n in exported if "lm_head.exits." in n]
    assert len(copies) == 2  # one per intermediate exit
    for n in copies:  # each started as the model's head and trained (the bug this guards against)
        assert not torch.equal(exported[n], head) and (exported[n] - head).abs().max() < 1.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "exits" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert set(evals[-1]["exits"]) == {"exit@1", "exit@2", "exit@4", "vote"}
    assert evals[-1]["exits"]["vote"]["loss"] == pytest.approx(summary.eval_loss, rel=1e-6)
    weights = [evals[-1]["exits"][f"exit@{e}"]["weight"] for e in (1, 2, 4)]  # the fitted vote's
    assert sum(weights) == pytest.approx(1.0)
    layout = json.loads((out / "final" / "depth.json").read_text())
    assert layout["weights"] == pytest.approx(weights)
    cfg = load_config(out / "config.resolved.yaml")
    reloaded = get_method("depth").apply(build_model(cfg.model, seed=cfg.train.seed), cfg.tuning)
    load_exits(reloaded, out / "final")
    assert controller_of(reloaded).weights == layout["weights"]
    assert math.isfinite(summary.final_loss)
