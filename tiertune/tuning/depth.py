"""Adaptive-depth tuning: LoRA trained one window of layers at a time through an exit head at the
window's top; at evaluation and generation every exit votes.

Exits sit after the layer counts ``tuning.depth.exits`` and after the last layer (the model's own head).
Window k is the layers between exit k-1 and exit k. A training step with window k:

- runs the layers below the window without autograd (they save nothing for backward and get no
  gradient), and the window's layers with it;
- stops after the window: the forward runs the first ``exit`` layers only (the model's layer loop takes
  ``config.num_hidden_layers`` of them, which the step sets and the forward's end restores), so the layers
  above are not run at all;
- computes the loss from exit k's head: with ``heads: cloned`` (the default) its own copy of the final norm
  and LM head, initialised from the model's and trained with the window; with ``heads: shared``, the
  model's final norm and LM head, trained by every window.

Only the window's adapters and its exit head get gradients; the others get none, and AdamW leaves a
parameter without a gradient untouched, moments included (as ``torch.optim.AdamW`` does). The schedule
(``round_robin`` or seeded ``random``, changing every ``steps_per_window`` steps) picks the window of each
step from the step number alone, so a resumed run continues it exactly.

In evaluation mode the forward runs the whole model, records the hidden state at each exit, and returns
the vote as its logits: ``max_confidence`` takes at each position the exit whose top probability is
highest, ``mean_probs`` averages the exits' distributions (the returned logits are then log-probabilities,
so the loss of the vote is its exact negative log-likelihood), and ``fitted`` mixes them with weights
fitted before each evaluation, on ``tuning.depth.calibration_batches`` batches of the training split
(:meth:`DepthController.fit`: the maximum-likelihood mixture; deep exits that know more weigh more). Generation calls the same forward, so it
follows the vote. :meth:`DepthController.score` accumulates per-exit loss and token accuracy.

Cloned heads are modules beside the ones they copy: the final norm and the LM head are wrapped (as peft
wraps a linear, the original under ``base_layer``), their copies under ``exits.<k>``; a copy is made
from the original's weights by name (:func:`source_name`), also when the engine builds it block by block.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import TuningConfig
from tiertune.errors import ConfigError
from tiertune.tuning.lora import LoraTuning
from tiertune.tuning.registry import register

IGNORE_INDEX = -100
EXITS_FILE = "exits.safetensors"
DEPTH_FILE = "depth.json"


class _Exits(nn.Module):
    """A module with copies for the exits: ``base_layer`` (the model's own) runs unless an exit is
    active, then ``exits[active]``."""

    def __init__(self, base: nn.Module, copies: int, controller: DepthController) -> None:
        super().__init__()
        self.base_layer = base
        self.exits = nn.ModuleDict({str(k): _copy(base) for k in range(copies)})
        self._controller = [controller]  # a list: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self._controller[0].active
        return self.base_layer(x) if active is None else self.exits[str(active)](x)

    def exit(self, k: int) -> nn.Module:
        return self.exits[str(k)]


def _copy(module: nn.Module) -> nn.Module:
    """A trainable copy of ``module``'s structure (meta parameters stay meta: the engine makes them)."""
    import copy

    made = copy.deepcopy(module)
    for p in made.parameters():
        p.requires_grad_(True)
    return made


def source_name(name: str) -> str:
    """The base model's name for a parameter of an exit copy (``lm_head.exits.2.weight`` ->
    ``lm_head.weight``): a cloned head starts as the model's own."""
    parts = name.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "exits" and parts[i + 1].isdigit():
            return ".".join(parts[:i] + parts[i + 2 :])
    return name


@dataclass
class DepthController:
    """The exits and the window of the current step; hooks on the model read it."""

    exits: list[int]  # layer counts after which an exit sits, the last = all layers
    heads: str
    schedule: str
    steps_per_window: int
    vote: str
    seed: int = 0
    window: int | None = None  # the exit the current training step trains through
    active: int | None = None  # the cloned head in use by the forward (None: the model's own)
    handles: list = field(default_factory=list)
    weights: list[float] | None = None  # the ``fitted`` vote's exit weights (None: equal)
    _captured: dict[int, torch.Tensor] = field(default_factory=dict)
    _calibration: list[torch.Tensor] = field(default_factory=list)
    _exit_logits: list[torch.Tensor] = field(default_factory=list)
    _scores: dict[str, list[float]] = field(default_factory=dict)

    # -- the schedule --------------------------------------------------------------------------------

    def window_for(self, step: int) -> int:
        """The window (= its exit's index) that step ``step`` (1-based) trains."""
        n, turn = len(self.exits), (step - 1) // self.steps_per_window
        if self.schedule == "random":
            return random.Random(self.seed * 1_000_003 + turn).randrange(n)
        return turn % n

    def begin_step(self, step: int) -> None:
        self.window = self.window_for(step)

    def bounds(self, k: int) -> tuple[int, int]:
        """Window k's layers: [first, end)."""
        return (self.exits[k - 1] if k else 0), self.exits[k]

    # -- evaluation ----------------------------------------------------------------------------------

    def vote_logits(self, per_exit: list[torch.Tensor]) -> torch.Tensor:
        return vote(per_exit, self.vote, self.weights)

    def calibrate(self, labels: torch.Tensor) -> None:
        """Keep the last evaluation forward's per-exit log-probabilities of ``labels``' targets, for
        :meth:`fit`."""
        if not self._exit_logits:
            return
        target = labels[:, 1:].to(self._exit_logits[0].device)
        mask = target != IGNORE_INDEX
        per_exit = [
            torch.gather(F.log_softmax(lg[:, :-1].float(), -1), -1, target.clamp_min(0)[..., None])[..., 0][
                mask
            ]
            for lg in self._exit_logits
        ]
        self._calibration.append(torch.stack(per_exit, dim=1))  # (targets, exits)
        self._exit_logits = []

    def fit(self, iterations: int = 200) -> list[float] | None:
        """The exit weights of the ``fitted`` vote: the mixture of the exits' distributions most likely to
        have produced the calibration targets (expectation-maximisation from equal weights; each
        iteration cannot lower the likelihood, and a single exit is among the mixtures, so on the
        calibration targets the vote's loss is at most the best exit's)."""
        if not self._calibration:
            return self.weights
        logp = torch.cat(self._calibration).double()
        self._calibration = []
        log_w = torch.full((logp.shape[1],), -math.log(logp.shape[1]), dtype=torch.float64)
        for _ in range(iterations):
            joint = logp + log_w
            resp = joint - torch.logsumexp(joint, dim=1, keepdim=True)
            log_w = torch.logsumexp(resp, dim=0) - math.log(logp.shape[0])
        self.weights = [float(w) for w in log_w.exp()]
        return self.weights

    def score(self, labels: torch.Tensor) -> None:
        """Add the last evaluation forward's per-exit and voted loss and token accuracy on ``labels``."""
        if not self._exit_logits:
            return
        target = labels[:, 1:].to(self._exit_logits[0].device)
        mask = target != IGNORE_INDEX
        entries = {f"exit@{e}": lg for e, lg in zip(self.exits, self._exit_logits)}
        entries["vote"] = self.vote_logits(self._exit_logits)
        for name, logits in entries.items():
            lg = logits[:, :-1].float()
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="sum",
                                   ignore_index=IGNORE_INDEX)  # fmt: skip
            correct = ((lg.argmax(-1) == target) & mask).sum()
            acc = self._scores.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += float(loss)
            acc[1] += float(correct)
            acc[2] += float(mask.sum())
        self._exit_logits = []

    def merge_scores(self, total: Callable[[list[float]], list[float]]) -> None:
        """Sum the scores kept since :meth:`metrics` over the ranks (each scored its own rows): ``total``
        sums a list of numbers over them, element by element."""
        names = [f"exit@{e}" for e in self.exits] + ["vote"]
        summed = total([x for n in names for x in self._scores.get(n, [0.0, 0.0, 0.0])])
        self._scores = {n: summed[3 * i : 3 * i + 3] for i, n in enumerate(names)}

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per exit and for the vote: mean token loss and accuracy since the last call (and each exit's
        weight in a fitted vote)."""
        out = {n: {"loss": s[0] / s[2], "accuracy": s[1] / s[2]} for n, s in self._scores.items() if s[2]}
        if self.vote == "fitted" and self.weights is not None:  # and each exit's weight in the vote
            for e, w in zip(self.exits, self.weights):
                if f"exit@{e}" in out:
                    out[f"exit@{e}"]["weight"] = w
        self._scores = {}
        return out


def vote(per_exit: list[torch.Tensor], how: str, weights: list[float] | None = None) -> torch.Tensor:
    """The exits' vote as logits: ``max_confidence`` picks at each position the exit whose top probability
    is highest (its logits); ``mean_probs`` returns the log of the exits' averaged distributions, and
    ``fitted`` of their mixture with ``weights`` (equal while there are none)."""
    stacked = torch.stack([lg.float() for lg in per_exit])  # (exits, batch, seq, vocab)
    if how == "fitted" and weights is not None:
        log_w = torch.tensor(weights, dtype=torch.float32, device=stacked.device).clamp_min(1e-30).log()
        return torch.logsumexp(F.log_softmax(stacked, -1) + log_w[:, None, None, None], 0)
    if how in ("mean_probs", "fitted"):
        return torch.logsumexp(F.log_softmax(stacked, -1), 0) - torch.log(torch.tensor(float(len(per_exit))))
    if how != "max_confidence":
        raise ValueError(f"unknown vote {how!r}")
    confidence = F.softmax(stacked, -1).amax(-1)  # (exits, batch, seq)
    best = confidence.argmax(0)  # the first exit among equals
    return torch.gather(stacked, 0, best[None, ..., None].expand(1, *stacked.shape[1:])).squeeze(0)


def controller_of(model: nn.Module) -> DepthController | None:
    return getattr(model, "_tiertune_depth", None)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str, str]:
    """(the causal LM, its decoder layers, the final norm's attribute path, the LM head's)."""
    lm = _base(model)
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(inner, "norm") or not hasattr(lm, "lm_head"):
        raise ConfigError(
            [
                f"tuning.method=depth: {type(lm).__name__} does not keep its layers as model.layers with "
                "model.norm and lm_head (Llama, Mistral and Qwen2 do); choose such a model"
            ]
        )
    return lm, layers, "model.norm", "lm_head"


def exits_for(cfg: TuningConfig, layers: int) -> list[int]:
    wanted = list(cfg.depth.exits) or sorted(
        {max(1, round(layers * q)) for q in (0.25, 0.5, 0.75)} - {layers}
    )
    bad = [e for e in wanted if not 1 <= e < layers]
    if bad or wanted != sorted(set(wanted)):
        raise ConfigError(
            [
                f"tuning.depth.exits: {cfg.depth.exits} must be increasing layer counts between 1 and "
                f"{layers - 1} (this model has {layers} layers; its own head is the last exit)"
            ]
        )
    return [*wanted, layers]


class DepthTuning(LoraTuning):
    name = "depth"

    def apply(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        model = super().apply(model, cfg)  # LoRA adapters in every layer; the base frozen
        lm, layers, norm_path, head_path = _parts(model)
        d = cfg.depth
        controller = DepthController(
            exits_for(cfg, len(layers)), d.heads, d.schedule, d.steps_per_window, d.vote, seed=d.seed
        )
        inner = lm.model
        if d.heads == "cloned":
            inner.norm = _Exits(inner.norm, len(controller.exits) - 1, controller)
            lm.lm_head = _Exits(lm.lm_head, len(controller.exits) - 1, controller)
            norm, head = inner.norm, lm.lm_head
            heads = [(norm.exit(k), head.exit(k)) for k in range(len(controller.exits) - 1)]
        else:
            for p in [*inner.norm.parameters(), *lm.lm_head.parameters()]:
                p.requires_grad_(True)
            heads = [(inner.norm, lm.lm_head)] * (len(controller.exits) - 1)
        model._tiertune_depth = controller  # a plain attribute: found by controller_of
        _install(controller, lm, layers, heads)
        return model

    def export(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
        """peft's adapter, plus the exit heads (``exits.safetensors``, names as in the model) and the exits'
        layout (``depth.json``): load the adapter with peft, the heads with :func:`load_exits`."""
        super().export(model, tokenizer, directory)
        import json

        from safetensors.torch import save_file

        c = controller_of(model)
        tensors = {
            n: p.detach().to("cpu").contiguous()
            for n, p in model.named_parameters()
            if ".exits." in n or (c.heads == "shared" and p.requires_grad and "lora_" not in n)
        }
        save_file(tensors, str(directory / EXITS_FILE))
        (directory / DEPTH_FILE).write_text(
            json.dumps({"exits": c.exits, "heads": c.heads, "vote": c.vote, "weights": c.weights}, indent=1)
            + "\n"
        )


def load_exits(model: nn.Module, directory: Path) -> None:
    """Load exported exit heads into a model that ``tuning.method=depth`` was applied to."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / EXITS_FILE))
    missing, unexpected = model.load_state_dict(saved, strict=False)
    if unexpected:
        raise ConfigError([f"{directory}: exit heads {unexpected[:3]} do not fit this model"])
    layout = Path(directory) / DEPTH_FILE
    controller = controller_of(model)
    if layout.is_file() and controller is not None:  # the fitted vote's weights, as the run last fitted them
        import json

        controller.weights = json.loads(layout.read_text()).get("weights")


def _install(controller: DepthController, lm: nn.Module, layers: nn.ModuleList, heads: list) -> None:
    """The hooks that run a training step through one window and make evaluation vote."""
    total = len(layers)
    state: dict[str, Any] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and controller.window is not None:
            k = controller.window
            first, end = controller.bounds(k)
            state["grad"] = torch.is_grad_enabled()
            lm.config.num_hidden_layers = end  # the layers above the window are not run
            controller.active = k if end < total and controller.heads == "cloned" else None
            state["first"] = first
            if first > 0:
                torch.set_grad_enabled(False)  # below the window: nothing saved, no gradient
        elif not module.training:
            controller._captured = {}
            state["evaluating"] = True

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        lm.config.num_hidden_layers = total
        controller.active = None
        if "grad" in state:
            torch.set_grad_enabled(state.pop("grad"))
            state.pop("first", None)
        if state.pop("evaluating", False) and output is not None and controller._captured:
            per_exit = [
                _exit_logits(heads[k], controller._captured[e]) for k, e in enumerate(controller.exits[:-1])
            ]
            per_exit.append(output.logits)
            controller._exit_logits = [lg.detach() for lg in per_exit]
            output.logits = controller.vote_logits(per_exit).to(output.logits.dtype)
        return output

    def enter_window(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if module.training and state.get("first") == index and "grad" in state:
                torch.set_grad_enabled(state["grad"])  # the window's layers train

        return hook

    def capture(count: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not module.training and "evaluating" in state:
                controller._captured[count] = output[0] if isinstance(output, tuple) else output

        return hook

    controller.handles.append(lm.register_forward_pre_hook(before, with_kwargs=True))
    controller.handles.append(lm.register_forward_hook(after, with_kwargs=True, always_call=True))
    for e in controller.exits[:-1]:
        controller.handles.append(layers[e].register_forward_pre_hook(enter_window(e)))
        controller.handles.append(layers[e - 1].register_forward_hook(capture(e)))


def _exit_logits(head: tuple[nn.Module, nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    norm, lm_head = head
    return lm_head(norm(hidden))


register(DepthTuning())
