"""The training engine: what the loop calls to run a micro-batch, apply a step and save state.

The loop never touches the model or the optimizer directly; it goes through :class:`TrainEngine`.
Where the weights live (resident on one device now, streamed from memory tiers by the offload
engine) and how the update runs (torch AdamW now, the tiered optimizer later) are the engine's
parts, chosen in :func:`build_engine`, so new placements and updaters plug in without touching the loop.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune import trace
from tiertune.config import JobConfig
from tiertune.errors import CheckpointError, ConfigError
from tiertune.launch.data import IGNORE_INDEX
from tiertune.launch.models import WeightSource, materialize, weight_source
from tiertune.launch.plan import machine_profile, nvme_dirs, nvme_free_bytes, plan_model
from tiertune.launch.progress import say
from tiertune.memory import Budgets, Kind, Ledger, Tier, format_bytes, resolve_budgets
from tiertune.memory.malloc import auto_mmap_threshold_mib, set_mmap_threshold
from tiertune.offload import find_blocks, planner
from tiertune.offload.blocks import parameter_users
from tiertune.offload.planner import OPTIMIZER_SLOTS, Plan
from tiertune.offload.shard import ShardGroup
from tiertune.offload.store import NvmeStore
from tiertune.offload.streaming import BlockStreamer, Flat
from tiertune.offload.tensorfile import write_safetensors
from tiertune.optim import StepReport, TorchAdamWUpdater, blockwise
from tiertune.optim.blockwise import BlockAdamW
from tiertune.optim.interleave import GPU_ADAMW_PARAMS_PER_S, Interleaver, UpdateProfile
from tiertune.optim.kernels import AdamWKernel, choose, make_kernel
from tiertune.tuning.registry import TuningMethod

TRAINABLE_FILE = "trainable.safetensors"


class Updater(Protocol):
    def step(self, lr: float) -> StepReport: ...
    def trainable(self) -> list[torch.Tensor]: ...  # what it updates: the weights, or their fp32 masters
    def weights_loaded(self) -> None: ...
    def zero_grad(self) -> None: ...
    def state_bytes(self) -> int: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...


def _targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels as [n, classes] and [n]: next-token prediction for [rows, seq_len] labels (the
    logits at t predict the label at t + 1), one class per row for [rows] labels."""
    if labels.ndim == 1:
        return logits.float(), labels
    return logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the targets whose label is not IGNORE_INDEX: the next tokens of a
    causal LM's [rows, seq_len] labels, or the classes of a classifier's [rows] labels.

    A sum, not a mean: the loop divides by the targets of the whole optimizer step, so the gradient is
    the same however the step is split into micro-batches.
    """
    return F.cross_entropy(*_targets(logits, labels), ignore_index=IGNORE_INDEX, reduction="sum")


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Targets whose label is the argmax of the logits (next tokens, or classes)."""
    flat_logits, flat_labels = _targets(logits, labels)
    return int((flat_logits.argmax(-1) == flat_labels).sum())


class TrainEngine:
    group: ShardGroup | None = None  # the ranks the state is sharded over (the streaming engine's)

    def __init__(
        self,
        model: nn.Module,
        updater: Updater,
        device: torch.device,
        dtype: str,
        ledger: Ledger | None = None,
    ) -> None:
        self.model, self.updater, self.device = model, updater, device
        # bf16: the model's weights are bf16 (its masters are the updater's); bf16-autocast: fp32 weights
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16-autocast" else None
        self.ledger = ledger or Ledger()
        self._account()

    def _account(self) -> None:
        """Report what this engine holds: everything is resident on the device tier (fp32 masters, if any,
        with the optimizer state; gradients on the weights or on their masters)."""
        params = list(self.model.parameters())
        graded = {id(p): p for p in [*params, *self.updater.trainable()] if p.grad is not None}
        self.ledger.set(Tier.DEVICE, Kind.PARAMS, sum(p.nbytes for p in params))
        self.ledger.set(Tier.DEVICE, Kind.GRADS, sum(p.grad.nbytes for p in graded.values()))
        self.ledger.set(Tier.DEVICE, Kind.OPTIMIZER, self.updater.state_bytes())

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits on ``batch`` (with its attention mask, if it has one), and its labels."""
        inputs = {
            k: batch[k].to(self.device, non_blocking=True)
            for k in ("input_ids", "attention_mask")
            if k in batch
        }
        labels = batch["labels"].to(self.device, non_blocking=True)
        with self._autocast():
            return self.model(**inputs).logits, labels

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_sum(*self._logits(batch))

    def forward_backward(
        self, batch: dict[str, torch.Tensor], step_targets: int, step_lr: float | None = None
    ) -> float:
        """Accumulate the gradient of this micro-batch's share of the step loss; return its loss sum.
        ``step_lr``: this is the step's last micro-batch and the step will use that lr (an updater may
        begin the update during this backward)."""
        self.model.train()
        with trace.span("compute", "forward"):
            loss_sum = self._loss_sum(batch)
        with trace.span("compute", "backward"):
            (loss_sum / step_targets).backward()
        self._account()
        return float(loss_sum.detach())

    def step(self, lr: float) -> StepReport:
        with trace.span("compute", "optimizer step"):
            report = self.updater.step(lr)
        self._account()
        return report

    def moved_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes the NVMe tier has read and written so far, by kind (none when nothing lives there)."""
        return {}

    def settle(self) -> None:
        """Finish what the last step left pending (the streaming engine's deferred updates), so that a
        checkpoint or an export that follows sees the final weights, and an error here is named as its own."""

    @torch.no_grad()
    def eval_sums(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """The loss sum over ``batch``'s targets and how many of them the argmax predicts (eval mode)."""
        self.model.eval()
        logits, labels = self._logits(batch)
        return float(loss_sum(logits, labels)), correct_count(logits, labels)

    def trainable(self) -> dict[str, torch.Tensor]:
        """What the optimizer updates, by parameter name: the trainable weights, or their fp32 masters."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return dict(zip(names, self.updater.trainable()))

    def save(self, directory: Path) -> None:
        """Write the trainable weights (their fp32 masters, if any) and the optimizer state into ``directory``."""
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in self.trainable().items()}
        save_file(tensors, str(directory / TRAINABLE_FILE))
        self.updater.save(directory)

    def load(self, directory: Path) -> None:
        tensors = load_file(str(directory / TRAINABLE_FILE))
        params = self.trainable()
        _check_names(directory, set(tensors), set(params))
        with torch.no_grad():
            for name, p in params.items():
                if tensors[name].shape != p.shape:
                    raise CheckpointError(
                        f"checkpoint {directory}: {name} has shape "
                        f"{tuple(tensors[name].shape)}, the model {tuple(p.shape)}"
                    )
                p.copy_(tensors[name])
        self.updater.weights_loaded()
        self.updater.load(directory)

    def export(self, method: TuningMethod, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
        """Write the trained result as ``method`` exports it (a full HF model directory, a peft adapter)."""
        self.close()  # every weight back in the model
        method.export(self.model, tokenizer, directory)

    def close(self, gather: bool = True) -> None:
        """Release what the engine holds outside the model (nothing, when everything is resident).
        ``gather``: leave every weight in the model (an export follows); False on the way out of an error."""


class StreamingEngine(TrainEngine):
    """Weights, gradients and optimizer state in the homes a :class:`Plan` gave them (see
    :mod:`tiertune.offload.streaming` and :mod:`tiertune.optim.blockwise`)."""

    def __init__(
        self,
        model: nn.Module,
        streamer: BlockStreamer,
        updater: BlockAdamW,
        device: torch.device,
        dtype: str,
        ledger: Ledger,
        store: NvmeStore | None,
        plan: Plan,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self.streamer, self.store, self.plan, self._cleanup = streamer, store, plan, cleanup
        self.group = streamer.group
        self._closed = False
        super().__init__(model, updater, device, dtype, ledger)

    def _account(self) -> None:
        """The streamer, the updater, the pools and the store report their bytes as they take them."""

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super()._loss_sum(batch)
        with self.streamer.saved_tensors():
            return super()._loss_sum(batch)

    def forward_backward(
        self, batch: dict[str, torch.Tensor], step_targets: int, step_lr: float | None = None
    ) -> float:
        self.model.train()
        with trace.span("compute", "forward"):
            loss_sum = self._loss_sum(batch)
        self.streamer.backward = True
        try:
            if step_lr is not None:
                self.updater.arm(step_lr)
            with trace.span("compute", "backward"):
                (loss_sum / step_targets).backward()
                self.updater.backward_done()  # sharded: the rest of the gradients summed across ranks
        finally:
            self.streamer.backward = False
            self.updater.disarm()
        return float(loss_sum.detach())

    def settle(self) -> None:
        self.updater.flush()

    def moved_bytes(self) -> dict[str, dict[str, int]]:
        return self.store.moved_bytes() if self.store is not None else {}

    def _weights(self, flats: list[Flat], masters: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter of ``flats`` as (name, tensor), read from its home one flat at a time (with
        ``masters``, a 16-bit trainable weight's fp32 master instead)."""
        self.updater.flush()
        self.streamer.drain()
        for f in flats:
            data = self.updater.master(f) if masters and f.trainable else None
            data = self.streamer.resident(f) if data is None else data
            for name, offset, shape in zip(f.flat.names, f.flat.offsets, f.shapes):
                yield name, data[offset : offset + shape.numel()].view(shape)

    def _write_weights(self, path: Path | None, flats: list[Flat], masters: bool = False) -> None:
        """Write ``flats``' weights into a safetensors file at ``path``; sharded, every rank calls this (the
        weights are gathered) and rank 0 writes: ``path`` None on the others."""

        def dtype(f: Flat) -> torch.dtype:
            return torch.float32 if masters and f.trainable else f.dtype

        entries = [(n, dtype(f), tuple(s)) for f in flats for n, s in zip(f.flat.names, f.shapes)]
        weights = self._weights(flats, masters)
        try:
            if path is not None:
                write_safetensors(path, entries, weights, metadata={"format": "pt"})
        finally:
            if self.group is not None:  # the other ranks' gathers go on to the end, even after an error
                for _ in weights:
                    pass

    def trainable(self) -> dict[str, torch.Tensor]:
        """What the optimizer updates, by parameter name (copies, read from their homes)."""
        return self.trainable_tensors(masters=True)

    def trainable_tensors(self, masters: bool = False) -> dict[str, torch.Tensor]:
        """Every trainable weight (``masters``: its fp32 master, if it has one) as a CPU tensor (a copy)."""
        trainable = [f for f in self.streamer.flats if f.trainable]
        return {n: t.to("cpu", copy=True) for n, t in self._weights(trainable, masters)}

    def save(self, directory: Path | None) -> None:
        """The trainable weights (their fp32 masters, if any) and the optimizer state, streamed from their
        homes block by block. Sharded, every rank takes part and rank 0 writes (``directory`` None on the
        others): the files are those of one process, so any number of ranks resumes from them."""
        trainable = [f for f in self.streamer.flats if f.trainable]
        failed: Exception | None = None
        try:
            self._write_weights(
                None if directory is None else directory / TRAINABLE_FILE, trainable, masters=True
            )
        except Exception as e:
            if self.group is None:
                raise
            failed, directory = e, None  # write nothing more, but take part in the other ranks' gathers
        self.updater.save(directory)
        if failed is not None:
            raise failed
        if self.store is not None:
            self.store.sync()

    def load(self, directory: Path) -> None:
        self.updater.discard()  # the checkpoint replaces whatever a pending update would have made
        names = {n for f in self.streamer.flats if f.trainable for n in f.flat.names}

        def saved(f: Flat, fh) -> torch.Tensor:  # noqa: ANN001 (safetensors' handle)
            """The flat's weights as the checkpoint holds them (fp32 masters of 16-bit weights)."""
            out = torch.empty(f.numel, dtype=torch.float32)
            for name, offset, shape in zip(f.flat.names, f.flat.offsets, f.shapes):
                out[offset : offset + shape.numel()].copy_(fh.get_tensor(name).reshape(-1))
            return out

        with safe_open(str(directory / TRAINABLE_FILE), framework="pt") as fh:
            _check_names(directory, set(fh.keys()), names)
            for f in self.streamer.flats:
                if not f.trainable:
                    continue
                for name, shape in zip(f.flat.names, f.shapes):
                    if fh.get_slice(name).get_shape() != list(shape):
                        raise CheckpointError(
                            f"checkpoint {directory}: {name} has shape "
                            f"{tuple(fh.get_slice(name).get_shape())}, the model {tuple(shape)}"
                        )
                self.streamer.load_weights(f, saved(f, fh))  # rounded, if 16-bit
            self.streamer.drain()
            self.updater.load(directory, masters=lambda f: saved(f, fh))

    def export(self, method: TuningMethod, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
        """A full model is written block by block from its homes (never whole in memory): an HF model
        directory. Other methods export from the model, with its weights gathered back into it."""
        writes = self.group is None or self.group.main  # sharded: every rank gathers, rank 0 writes
        if method.name != "full":  # adapters: only the trained weights come back, the base stays home
            self.close(frozen=False)
            if writes:
                method.export(self.model, tokenizer, directory)
            return
        if writes:
            directory.mkdir(parents=True, exist_ok=True)
            self.model.config.architectures = [type(self.model).__name__]  # as save_pretrained records it
            self.model.config.save_pretrained(directory)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
        self._write_weights(directory / "model.safetensors" if writes else None, self.streamer.flats)

    def close(self, gather: bool = True, frozen: bool = True) -> None:
        """Remove the hooks, bring the weights back into the model (``gather``; the frozen ones too unless
        ``frozen`` is False), delete the store's files. Once; each part is released even when an earlier
        one fails."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                if gather:  # the weights are final once the last step's updates have run
                    self.updater.flush()
            except BaseException:
                gather = False
                raise
            finally:
                self.streamer.close(gather=gather, frozen=frozen)
        finally:
            try:
                self.updater.close()
            finally:
                try:
                    if self.store is not None:
                        self.store.close()
                finally:
                    if self._cleanup is not None:
                        self._cleanup()


def _check_names(directory: Path, found: set[str], names: set[str]) -> None:
    if found != names:
        missing, extra = sorted(names - found), sorted(found - names)
        raise CheckpointError(
            f"checkpoint {directory} does not hold this job's trainable weights "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written by a different job?"
        )


def build_engine(
    cfg: JobConfig,
    model: nn.Module,
    device: torch.device,
    budgets: Budgets | None = None,
    ledger: Ledger | None = None,
    store_dir: Path | None = None,
    group: ShardGroup | None = None,
    always_stream: bool = False,
    decayed: Callable[[str], bool] | None = None,
) -> TrainEngine:
    """Plan the job and build the engine that follows the plan.

    Everything at home on the device (and no ``offload.*`` set): the model stays as it is and torch's
    AdamW updates it. Otherwise the weights go into flat blocks in their homes, streamed through a window
    on the device, and :class:`BlockAdamW` updates each block where its state lives. NVMe homes go into a
    store in ``offload.nvme_dir``, else in ``store_dir`` (made for the run and deleted after it). With
    ``group`` (several ranks) every block's state is sharded over the ranks, always in the block engine;
    each rank's store is a ``rank-N`` directory of its own. ``always_stream``: the block engine even when
    everything fits (the Trainer plugin: the gradients must leave the parameters). ``decayed``: which
    parameters (by name) weight decay applies to, when not the matrices.
    """
    ledger = ledger or Ledger()
    share = group.local_world if group is not None else 1
    budgets = budgets or resolve_budgets(cfg.memory, device, share=share)
    forced = any(getattr(cfg.offload, k) != "auto" for k in ("params", "grads", "optimizer"))
    if group is not None:
        store_dir = store_dir / f"rank-{group.rank}" if store_dir is not None else None
    room = _store_room(cfg, store_dir) // share  # the ranks of a machine share its drives
    plan = plan_model(cfg, model, budgets, room, shards=group.world if group is not None else 1)
    threshold = cfg.memory.malloc_mmap_threshold_mib
    if threshold == "auto":
        host = Tier.DEVICE if budgets.device_is_host else Tier.HOST  # where malloc's memory is counted
        threshold = auto_mmap_threshold_mib(
            any(t is Tier.NVME for b in plan.blocks for t in b.home.values()),
            plan.peak_bytes.get(host, 0),
            plan.budgets.get(host, 0),
        )
    if threshold:  # process-wide, and kept for the jobs that follow in this process
        set_mmap_threshold(threshold)
    everything_home = all(b.home[k] is Tier.DEVICE for b in plan.blocks for k in b.home)
    if everything_home and not forced and group is None and not always_stream:
        if any(p.is_meta for p in model.parameters()):
            materialize(model, weight_source(cfg.model, cfg.train.seed, model), device)
        model.to(device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return TrainEngine(model, TorchAdamWUpdater(named, cfg.optim), device, cfg.train.dtype, ledger)
    return _streaming_engine(cfg, model, device, budgets, ledger, plan, store_dir, group, decayed)


def _remove_store(store_dir: Path, shared: bool) -> None:
    """Delete a run's own store directory; ``shared``: it is one rank's, in a directory of every rank's,
    which the last rank to finish removes."""
    shutil.rmtree(store_dir, ignore_errors=True)
    if shared:
        with contextlib.suppress(OSError):  # not empty yet: another rank's store is still there
            store_dir.parent.rmdir()


def _store_room(cfg: JobConfig, store_dir: Path | None) -> int:
    if cfg.offload.nvme_dir:
        return nvme_free_bytes(nvme_dirs(cfg))
    return nvme_free_bytes([store_dir]) if store_dir is not None else 0


def _streaming_engine(
    cfg: JobConfig,
    model: nn.Module,
    device: torch.device,
    budgets: Budgets,
    ledger: Ledger,
    plan: Plan,
    store_dir: Path | None,
    group: ShardGroup | None,
    decayed: Callable[[str], bool] | None = None,
) -> StreamingEngine:
    params = {b.name: b.home[Kind.PARAMS] for b in plan.blocks}
    optim = {b.name: b.home[Kind.OPTIMIZER] for b in plan.blocks if b.trainable}
    grads = {b.home[Kind.GRADS] for b in plan.blocks if b.trainable}
    problems = []
    host_side = {Tier.DEVICE} if device.type == "cpu" else {Tier.HOST, Tier.CXL}
    if not grads <= host_side:
        where = ", ".join(sorted(t.value for t in grads - host_side))
        problems.append(
            f"the plan puts gradients on {where}; this release keeps them in "
            f"{'host memory' if device.type == 'cpu' else 'host or CXL memory'}: raise "
            "memory.host_budget_gib, or set offload.grads to host"
        )
    if problems:
        raise ConfigError(problems)
    store, cleanup = None, None
    nvme_bytes = sum(b.bytes[k] for b in plan.blocks for k in b.home if b.home[k] is Tier.NVME)
    if nvme_bytes:
        if cfg.offload.nvme_dir:
            dirs = nvme_dirs(cfg)
            if group is not None:  # a store per rank: each holds its own lock
                dirs = [d / f"rank-{group.rank}" for d in dirs]
                for d in dirs:
                    d.mkdir(exist_ok=True)
        else:
            if store_dir is None:
                raise ConfigError(
                    ["offload: state on NVMe needs offload.nvme_dir (a directory on a fast drive)"]
                )
            store_dir.mkdir(parents=True, exist_ok=True)
            dirs = [store_dir]
        # Extents are rounded to 4 KiB per flat and per optimizer chunk: leave room for that rounding.
        slack = 4096 * (4 * len(plan.blocks) + nvme_bytes // (64 * 2**20) + 16)
        if cfg.offload.io_backend == "deepspeed":
            say("NVMe I/O through DeepSpeed's async_io op (compiled on first use: a few minutes, once)")
        store = NvmeStore(dirs, nvme_bytes + slack, ledger=ledger, backend=cfg.offload.io_backend)
        if not cfg.offload.nvme_dir:  # ours alone now (the store holds its lock): deleted after the run
            cleanup = lambda: _remove_store(store_dir, shared=group is not None)  # noqa: E731
    try:
        blocks = find_blocks(model)
        streamer = BlockStreamer(
            model,
            blocks,
            params,
            device,
            depth=plan.prefetch_depth,
            store=store,
            ledger=ledger,
            home_nodes={Tier.CXL: list(budgets.cxl_nodes)},
            make=_maker(model, lambda: weight_source(cfg.model, cfg.train.seed, model)),
            group=group,
        )
        updater = BlockAdamW(
            streamer,
            cfg.optim,
            optim,
            next(iter(grads)),
            store=store,
            ledger=ledger,
            chunk_bytes=planner.OPTIMIZER_CHUNK_BYTES,
            slots=plan.buffers.get("optimizer", (0, OPTIMIZER_SLOTS))[1],  # as many as the plan counted
            order=[n for n, p in model.named_parameters() if p.requires_grad],
            overlap=cfg.optim.overlap,
            rollback_bytes=_rollback_room(cfg, plan, device, group.world if group is not None else 1),
            kernel=_kernel(cfg),
            decayed=decayed,
            **_interleaving(cfg, device, plan),
        )
    except BaseException:
        if store is not None:
            store.close()
        if cleanup is not None:
            cleanup()
        raise
    say(_describe(plan, store, temporary=cleanup is not None))
    return StreamingEngine(model, streamer, updater, device, cfg.train.dtype, ledger, store, plan, cleanup)


# Pinned copy bandwidth assumed each way when no machine profile measured it: PCIe 4.0 x16 in practice.
DEFAULT_PCIE_BYTES_PER_S = 25e9


def _update_profile(cfg: JobConfig) -> UpdateProfile:
    """The interleaver's prior: the machine profile's figures where `tiertune probe` measured them on an
    accelerator, else the CPU kernel's measured rate (or a modest default) and a typical PCIe link."""
    profile = machine_profile(cfg)
    if profile is not None and profile.cuda:
        return UpdateProfile.from_machine(profile)
    cpu = profile.cpu_adamw_params_per_s if profile is not None else 1e9
    return UpdateProfile(cpu, GPU_ADAMW_PARAMS_PER_S, DEFAULT_PCIE_BYTES_PER_S, DEFAULT_PCIE_BYTES_PER_S)


def _interleaving(cfg: JobConfig, device: torch.device, plan: Plan) -> dict:
    """BlockAdamW's arguments for updates on the device: on an accelerator (or on the CPU when the tests
    ask for that path), with the device memory the plan leaves free as scratch."""
    if not cfg.optim.interleave or not (device.type == "cuda" or blockwise.UPDATE_ON_CPU):
        return {}
    free = plan.budgets.get(Tier.DEVICE, 0) - plan.peak_bytes.get(Tier.DEVICE, 0)
    return {
        "interleave": Interleaver(_update_profile(cfg)),
        "update_device": device,
        "device_free_bytes": max(0, free),
    }


def _kernel(cfg: JobConfig) -> AdamWKernel:
    """The CPU AdamW kernel ``optim.kernel`` asks for (auto: the faster as the machine profile measured)."""
    profile = machine_profile(cfg)
    name = choose(cfg.optim.kernel, profile.cpu_adam_kernels if profile is not None else {})
    if name == "deepspeed":
        say("AdamW on the CPU through DeepSpeed's CPU Adam (compiled on first use: a minute or two, once)")
    try:
        return make_kernel(name)
    except ConfigError as e:
        if cfg.optim.kernel != "auto":
            raise
        say(f"note: the {name} AdamW kernel cannot run here ({e.problems[0]}); using torch's")
        return make_kernel("torch")


# Undo space for speculative updates, as a share of what undoing every block would take (12 bytes a
# parameter: weights and two moments). The blocks that complete first in backward (the head, the top
# layers) have the most backward left to hide behind; the rest wait for their next forward, which hides
# them too. A quarter keeps the cost in host memory small next to the state itself.
UNDO_SHARE = 0.25


def _rollback_room(cfg: JobConfig, plan: Plan, device: torch.device, shards: int = 1) -> int:
    """Host memory for undoing speculative updates: :data:`UNDO_SHARE` of what undoing every block takes
    (this rank's shards of them), at most half of what the plan leaves free on the host side (the rest
    stays a margin)."""
    if cfg.optim.overlap != "backward":
        return 0
    host = Tier.DEVICE if device.type == "cpu" else Tier.HOST
    free = plan.budgets.get(host, 0) - plan.peak_bytes.get(host, 0)
    trainable = [-(-b.trainable // shards) for b in plan.blocks]
    room = min(max(0, free) // 2, int(UNDO_SHARE * 12 * sum(trainable)))
    if room < 12 * max(trainable):
        say(
            "note: no spare host memory to undo speculative updates: each block's update waits for its next forward"
        )
    return room


def _maker(
    model: nn.Module, open_source: Callable[[], WeightSource]
) -> Callable[[dict[str, torch.Tensor]], dict[str, nn.Parameter]]:
    """Makes a block's meta parameters; the weights' source is opened only when one is needed."""
    users = parameter_users(model)  # once: a block's parameters are made in one call each
    source: list[WeightSource] = []

    def make(views: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
        if not source:
            source.append(open_source())
        return materialize(model, source[0], only=views, users=users)

    return make


def _describe(plan: Plan, store: NvmeStore | None, temporary: bool) -> str:
    """One line: where each kind of state lives, and the store."""
    parts = []
    for kind in (Kind.PARAMS, Kind.GRADS, Kind.OPTIMIZER):
        per_tier: dict[Tier, int] = {}
        for b in plan.blocks:
            if b.bytes[kind]:
                per_tier[b.home[kind]] = per_tier.get(b.home[kind], 0) + b.bytes[kind]
        where = " + ".join(f"{format_bytes(n)} {t.value}" for t, n in per_tier.items())
        parts.append(f"{kind.value} {where}")
    line = "state: " + ", ".join(parts)
    if store is not None:
        dirs = ", ".join(str(d) for d in store.dirs)
        line += f"; NVMe store in {dirs}" + (" (deleted when the run ends)" if temporary else "")
    return line
