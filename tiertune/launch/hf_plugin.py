"""tiertune's offload engine and block-wise AdamW under an unmodified HuggingFace ``Trainer``.

    from tiertune.launch.hf_plugin import TiertunePlugin

    plugin = TiertunePlugin(model, args, {"offload.params": "nvme", "offload.optimizer": "nvme"})
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=plugin.optimizers(), callbacks=[plugin])
    trainer.train()

The plugin is the two things a Trainer already takes: the optimizer pair and a callback. Building it puts
the model's blocks into their homes as the plan says (the same engine as ``tiertune train``: weights
streamed through a window, gradients leaving each parameter as it completes, AdamW block by block where
the state lives, each block's update run just before its next forward), and hooks the model so that:

- every forward keeps what backward reads of the streamed weights safe (the streamer's saved-tensor
  hooks), and backward prefetches the blocks in its own order;
- ``state_dict()`` gives the real weights (read from their homes), and ``load_state_dict()`` puts
  weights into their homes (a Trainer checkpoint saved and resumed: the optimizer's ``state_dict`` is
  ``torch.optim.AdamW``'s, with each 16-bit weight's fp32 master beside its moments).

The hyperparameters are the ``TrainingArguments``' (``learning_rate``, ``weight_decay`` on the parameters
the Trainer decays, ``adam_beta1``/``adam_beta2``/``adam_epsilon``, ``max_grad_norm``), and the schedule
is the Trainer's own (its scheduler drives the optimizer's lr). Clipping runs in the optimizer's step,
exactly as ``clip_grad_norm_`` over all the gradients: the Trainer's own clipping finds no gradient on
the parameters (they have left for their homes), so the plugin writes the real norm into the logs
(``grad_norm``; reporting callbacks that run before the plugin's see 0). tiertune's own keys for the
placement go in ``options`` (``offload.*``, ``memory.*``, ``optim.kernel``, ``optim.interleave``,
``optim.overlap`` ``forward`` or ``none``; ``data.seq_len`` sizes the plan's activations).

After training the model goes on working through the plugin (evaluation, ``trainer.save_model()``,
generation); :meth:`close` removes the hooks and the NVMe store (with ``gather``, after bringing every
weight back into the model), as leaving a ``with TiertunePlugin(...) as plugin:`` block does (without).
A bf16 model gets fp32 master weights with its optimizer state, so it trains more exactly than the plain
Trainer's AdamW on the bf16 weights themselves: the two differ by bf16 rounding.

Limits, each refused where it would otherwise go wrong: one process (for several, ``tiertune launch``);
fp16 mixed precision with its loss scaler (use bf16); updates during backward (``optim.overlap=backward``:
the Trainer does not say which backward is a step's last). The Trainer saves a checkpoint through
``state_dict()``: host memory must hold the model's weights and optimizer state then (``tiertune train``
writes them block by block).
"""

from __future__ import annotations

import atexit
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from tiertune.config import load_config
from tiertune.errors import ConfigError
from tiertune.launch.distributed import ranks_from_env
from tiertune.launch.engine import StreamingEngine, build_engine
from tiertune.offload.streaming import Flat
from tiertune.optim import StepReport

# The tiertune keys a plugin takes: where the state lives and how the update runs. The rest of a job is
# the Trainer's (its TrainingArguments).
PLUGIN_KEYS = ("offload.", "memory.", "optim.kernel", "optim.interleave", "optim.overlap", "data.seq_len")


def _job_overrides(args: TrainingArguments, options: dict[str, Any]) -> list[str]:
    """The tiertune config of a Trainer's job: the arguments' hyperparameters and ``options``."""
    problems = [
        f"{key}: not a placement key; set it in TrainingArguments (the Trainer runs the job), or use one "
        f"of {', '.join(PLUGIN_KEYS)}"
        for key in options
        if not key.startswith(PLUGIN_KEYS)
    ]
    if options.get("optim.overlap", "forward") == "backward":
        problems.append(
            "optim.overlap: backward needs to know which backward is a step's last, which the Trainer does "
            "not say; use forward (the default: each block's update just before its next forward) or none"
        )
    if args.fp16:
        problems.append("TrainingArguments.fp16: its loss scaler is not supported with tiertune; use bf16")
    if problems:
        raise ConfigError(problems)
    hyper = {
        "optim.lr": args.learning_rate,
        "optim.weight_decay": args.weight_decay,
        "optim.betas": f"[{args.adam_beta1}, {args.adam_beta2}]",
        "optim.eps": args.adam_epsilon,
        "optim.max_grad_norm": args.max_grad_norm or 0.0,
        "optim.overlap": "forward",
        "train.micro_batch_size": args.per_device_train_batch_size,
        "train.grad_accum_steps": args.gradient_accumulation_steps,
        "train.seed": args.seed,
    }
    return [f"{k}={v}" for k, v in {**hyper, **options}.items()]


class TiertuneOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer: its one parameter group carries the lr the Trainer's scheduler sets; a
    step is tiertune's (clip, check, update where the state lives)."""

    def __init__(self, engine: StreamingEngine, params: list[nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.engine = engine
        self.last: StepReport | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last = self.engine.step(self.param_groups[0]["lr"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.updater.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        saved = self.engine.updater.state_dict()
        saved["trainer_group"] = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        group = state_dict.get("trainer_group")
        if group is not None:  # the scheduler's lr and its initial lr, as the checkpoint left them
            self.param_groups[0].update(group)
        self.engine.updater.load_state_dict(state_dict)


class TiertunePlugin(TrainerCallback):
    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        options: dict[str, Any] | None = None,
        store_dir: str | Path | None = None,
    ) -> None:
        """Put ``model``'s state into its homes for a Trainer with ``args``; ``options``: tiertune's
        placement keys (see the module docstring). An NVMe store without ``offload.nvme_dir`` goes into
        ``store_dir`` (default ``<args.output_dir>/nvme-store``) and is deleted by :meth:`close`."""
        if ranks_from_env() is not None:
            raise ConfigError(
                ["the Trainer plugin runs in one process; for several ranks use `tiertune launch` (torchrun)"]
            )
        self.cfg = load_config(None, _job_overrides(args, dict(options or {})))
        decayed = set(Trainer.get_decay_parameter_names(None, model))  # the Trainer's own rule (no self)
        store = Path(store_dir) if store_dir is not None else Path(args.output_dir or ".") / "nvme-store"
        engine = build_engine(
            self.cfg, model, args.device, store_dir=store, always_stream=True, decayed=decayed.__contains__
        )
        assert isinstance(engine, StreamingEngine)  # always_stream: the block engine
        self.engine, self.model = engine, model
        self._where = {
            id(p): (f, o, s)
            for f in engine.streamer.flats
            for p, o, s in zip(f.params, f.flat.offsets, f.shapes)
        }
        self._hooks: list[Any] = []
        self._saving: list[Any] = []  # the saved-tensor contexts of forwards under way
        self._loaded: dict[int, torch.Tensor] = {}  # a state_dict's values of our parameters, being loaded
        self._loaded_keys: set[str] = set()
        self._hook_model(model)
        self.optimizer = TiertuneOptimizer(
            engine, [p for p in model.parameters() if p.requires_grad], args.learning_rate
        )
        self._closed = False
        atexit.register(self.close, False)

    def optimizers(self) -> tuple[TiertuneOptimizer, None]:
        """The Trainer's ``optimizers`` pair: the optimizer, and no scheduler (the Trainer makes its own
        from the arguments, over this optimizer)."""
        return self.optimizer, None

    # -- the model's hooks --------------------------------------------------------------------------

    def _hook_model(self, model: nn.Module) -> None:
        self._hooks.append(model.register_forward_pre_hook(self._forward_begins))
        self._hooks.append(model.register_forward_hook(self._forward_ends))
        owners = [
            m for m in model.modules() if any(id(p) in self._where for p in m.parameters(recurse=False))
        ]

        # torch marks the hooks it is given: functions of their own, not bound methods
        def state_dict(*args: Any) -> None:
            self._state_dict(*args)

        def load_begins(*args: Any) -> None:
            self._load_begins(*args)

        def load_ends(*args: Any) -> None:
            self._load_ends(*args)

        for m in owners:
            self._hooks.append(m.register_state_dict_post_hook(state_dict))
            self._hooks.append(m.register_load_state_dict_pre_hook(load_begins))
            self._hooks.append(m.register_load_state_dict_post_hook(load_ends))

    def _forward_begins(self, module: nn.Module, args: Any) -> None:
        self.engine.streamer.backward = False
        context = self.engine.streamer.saved_tensors() if torch.is_grad_enabled() else None
        if context is not None:
            context.__enter__()
        self._saving.append(context)

    def _forward_ends(self, module: nn.Module, args: Any, output: Any) -> None:
        context = self._saving.pop()
        if context is not None:
            context.__exit__(None, None, None)
        logits = output.get("logits") if isinstance(output, dict) else None
        if isinstance(logits, torch.Tensor) and logits.requires_grad:  # backward starts there
            logits.register_hook(self._backward_begins)

    def _backward_begins(self, grad: torch.Tensor) -> None:
        self.engine.streamer.backward = True  # prefetch the blocks before, as backward will want them

    def _values(self, p: nn.Parameter) -> torch.Tensor:
        f, offset, shape = self._where[id(p)]
        return (
            self.engine.streamer.resident(f)[offset : offset + shape.numel()].view(shape).to("cpu", copy=True)
        )

    def _state_dict(self, module: nn.Module, state: dict, prefix: str, metadata: Any) -> None:
        """The module's own parameters as they are (their homes'), not the placeholders they point at."""
        self.engine.settle()  # pending updates first
        for name, p in module.named_parameters(recurse=False):
            if id(p) in self._where and prefix + name in state:
                state[prefix + name] = self._values(p)

    def _load_begins(self, module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
        """Take the module's parameters out of a state_dict being loaded: they go to their homes."""
        for name, p in module.named_parameters(recurse=False):
            if id(p) in self._where and prefix + name in state:
                self._loaded[id(p)] = state.pop(prefix + name)
                self._loaded_keys.add(prefix + name)

    def _load_ends(self, module: nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in self._loaded_keys]
        mine = [p for p in module.parameters(recurse=False) if id(p) in self._loaded]
        if not mine:
            return
        self.engine.settle()
        by_flat: dict[Flat, list[nn.Parameter]] = {}
        for p in mine:
            by_flat.setdefault(self._where[id(p)][0], []).append(p)
        for f, params in by_flat.items():
            values = self.engine.streamer.resident(f).to("cpu", torch.float32, copy=True)
            for p in params:
                _, offset, shape = self._where[id(p)]
                given = self._loaded.pop(id(p))
                if given.shape != shape:
                    raise ConfigError(
                        [f"load_state_dict: {tuple(given.shape)} for a parameter of {tuple(shape)}"]
                    )
                values[offset : offset + shape.numel()] = given.reshape(-1).float()
            self.engine.streamer.load_weights(f, values)
            self.engine.updater.weights_set(f)

    # -- the Trainer's events -------------------------------------------------------------------------

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None, **kw: Any
    ) -> None:
        """The real gradient norm in the logs: the Trainer's own measures the parameters' (none left)."""
        last = self.optimizer.last
        if logs is None or last is None or "grad_norm" not in logs:
            return
        norm = last.grad_norm if math.isfinite(last.grad_norm) else float("nan")
        logs["grad_norm"] = norm
        if state.log_history and "grad_norm" in state.log_history[-1]:
            state.log_history[-1]["grad_norm"] = norm

    def __enter__(self) -> TiertunePlugin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(gather=False)

    def close(self, gather: bool = True) -> None:
        """Remove the hooks and delete the store's files; with ``gather``, every weight comes back into the
        model first (it then works without the plugin, and needs the memory for all of it)."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self.engine.close(gather=gather)
