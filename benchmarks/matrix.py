"""The benchmark matrix: model sizes x tuning methods x systems (plain PyTorch, tiertune with its state in
RAM, host memory or on NVMe, DeepSpeed ZeRO-2 / ZeRO-3 with CPU offload, ZeRO-3 with NVMe offload), the
same seeded model, data and batch for every system of a row.

    bash scripts/venv-run python benchmarks/matrix.py                      # the default matrix (~25 min here)
    bash scripts/venv-run python benchmarks/matrix.py --sizes tiny-llama --methods full,lora --steps 8
                                                      [--systems pytorch,tiertune-nvme,...] [--warmup 3]
                                                      [--micro-batch N] [--seq-len 128] [--out DIR]
                                                      [--nvme-dir DIR] [--timeout-s 1800]

Every cell (one size, one method, one system) runs in a process of its own, so its peak RSS (VmHWM) and
its storage traffic (``/proc/self/io``: every byte the process and its I/O threads read from or wrote to
a drive, O_DIRECT included, so NVMe offload of every system is counted alike) are its own. A cell trains
``--steps`` optimizer steps; the first ``--warmup`` are not timed (by default 30 and 5, or 7 and 3 for
presets above 500M parameters). It reports the median step time and the spread of the timed steps,
tokens/s, peak RSS, peak device memory (on CUDA), the NVMe bytes read and written per timed step, and
the losses of its steps (a row's systems train the same model on the same rows with the same AdamW,
schedule and clipping, so their losses agree closely; the table prints the largest gap from PyTorch's).

The systems:

- ``pytorch``: the textbook loop (``torch.optim.AdamW``, fused, over the trainable parameters; everything in
  memory): the reference of every ratio;
- ``tiertune-ram``, ``tiertune-host``, ``tiertune-nvme``: ``tiertune train`` with ``offload.params`` and
  ``offload.optimizer`` set to ``device``, ``host`` or ``nvme`` (gradients stay in memory). Without an
  accelerator the device tier *is* host memory, so ``host`` is the same plan as ``ram`` and is not run
  twice (the cell says so);
- ``ds-zero2-cpu``: DeepSpeed ZeRO-2, ``offload_optimizer`` to the CPU, its ``DeepSpeedCPUAdam``;
- ``ds-zero3-cpu``: ZeRO-3, ``offload_param`` and ``offload_optimizer`` to the CPU;
- ``ds-zero3-nvme``: ZeRO-3 with both on NVMe (ZeRO-Infinity, its libaio ``async_io`` op). For ZeRO-3 the
  model is built as transformers builds it for ZeRO-3, inside ``deepspeed.zero.Init``, each parameter
  partitioned as it is made (so it never exists whole); DeepSpeed's parameter swap buffers are sized to
  the largest parameter, as in ``benchmarks/zero_infinity.py``, and its optimizer step holds the state of
  ``--ds-sub-group-size`` parameters at a time (DeepSpeed's default, 1e9, is the whole of a 1B model).

The tuning methods are tiertune's (``full``, ``lora``, ``luc_lora``, ``s2a``); the baselines train the
very same module (tiertune's method applied to the same seeded base). ``luc_lora`` replaces the base's
linears by compressed ones that ZeRO-3 cannot partition, so ZeRO-3 cells of it are not run (said in the
table). A cell that fails (out of memory, an assertion inside DeepSpeed) is reported with its reason and
the matrix goes on: a failed cell is a result too.

Results go to ``--out`` (default ``benchmarks/results/matrix``): ``matrix.json`` (every cell, every step),
``matrix.md`` (the table, with the machine and the command) and ``matrix.png`` (step time and peak RSS of
each system, per row). DeepSpeed needs its ops built once (cpu_adam; async_io needs Debian's
``libaio-dev``); without them its cells say what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _deepspeed import AIO, free_port  # benchmarks/, the script's own directory

REPO = Path(__file__).resolve().parent.parent
SIZES = ("tiny-llama", "small-llama", "llama-1.1b")
METHODS = ("full", "lora", "luc_lora", "s2a")
SYSTEMS = (
    "pytorch",
    "tiertune-ram",
    "tiertune-host",
    "tiertune-nvme",
    "ds-zero2-cpu",
    "ds-zero3-cpu",
    "ds-zero3-nvme",
)
PLACEMENT = {
    "pytorch": "ram",
    "tiertune-ram": "ram",
    "tiertune-host": "host",
    "tiertune-nvme": "nvme",
    "ds-zero2-cpu": "host",
    "ds-zero3-cpu": "host",
    "ds-zero3-nvme": "nvme",
}
# The last size runs only these methods by default: each of its cells is minutes here.
BIG_METHODS = ("full",)
BIG_PARAMS = 500e6  # presets above this train micro-batches of 1 by default (a 2-core step is ~20 s)
# Steps and warm-up by default: a small preset's step is a tenth of a second here, where one busy moment of
# either core moves a step by half; 25 timed steps cost seconds and steady the median. A big preset's step
# is seconds (its first steps fault in its optimizer state), so it times 4 after 3 of warm-up.
SMALL_STEPS, SMALL_WARMUP = 30, 5
BIG_STEPS, BIG_WARMUP = 7, 3
METHOD_KEYS = {  # what each method trains, the same for every system
    "full": [],
    "lora": ["tuning.method=lora", "tuning.lora.r=16", "tuning.lora.alpha=32"],
    "luc_lora": [
        "tuning.method=luc_lora",
        "tuning.lora.r=16",
        "tuning.lora.alpha=32",
        "tuning.luc.avg_bits=4",
    ],
    "s2a": ["tuning.method=s2a", "tuning.s2a.modules=[side,bias]", "tuning.s2a.side_dim=64"],
}
MARK = "matrix: "  # the lines a cell's process passes on to the parent


@dataclass
class Cell:
    size: str
    method: str
    system: str
    steps: int
    warmup: int
    micro_batch: int
    seq_len: int
    nvme_dir: str
    ds_sub_group_size: int = 10**9  # ZeRO-3's optimizer sub-group (DeepSpeed's default)
    # filled by the run
    status: str = "ok"  # ok, skipped, failed
    reason: str = ""
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    nvme_read_bytes: list[int] = field(default_factory=list)  # per step, from /proc/self/io
    nvme_write_bytes: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    def timed(self, values: list) -> list:
        return values[self.warmup :]

    @property
    def median_step_s(self) -> float | None:
        t = self.timed(self.step_s)
        return statistics.median(t) if t else None

    @property
    def step_quartiles(self) -> tuple[float, float]:
        """The first and third quartiles of the timed step times (both the one step, if one is timed)."""
        t = self.timed(self.step_s)
        if len(t) < 2:
            return (t[0], t[0]) if t else (0.0, 0.0)
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
        return q1, q3

    @property
    def step_spread(self) -> float | None:
        """The interquartile range of the timed step times over their median: how far apart the steps
        of one cell are (the noise a ratio between two cells has to rise above)."""
        if len(self.timed(self.step_s)) < 2:
            return None
        q1, q3 = self.step_quartiles
        return (q3 - q1) / self.median_step_s

    def median_io(self, values: list[int]) -> float | None:
        t = self.timed(values)
        return statistics.median(t) if t else None


def job_overrides(cell: Cell, out: Path) -> list[str]:
    """The job every system trains, as tiertune overrides (the baselines read the same config)."""
    return [
        "train.progress=off",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        "train.eval_exact_match_samples=0",
        "train.tensorboard=off",
        "optim.warmup_steps=0",
        "optim.max_grad_norm=1.0",
        "train.device=cpu" if cell.system.startswith("ds-") else "train.device=auto",
        f"model.preset={cell.size}",
        f"train.micro_batch_size={cell.micro_batch}",
        f"data.seq_len={cell.seq_len}",
        f"train.max_steps={cell.steps}",
        *METHOD_KEYS[cell.method],
        f"output_dir={out}",
    ]


def io_counters() -> tuple[int, int]:
    """Bytes this process (all its threads) read from and wrote to storage so far (``/proc/self/io``)."""
    import psutil

    io = psutil.Process().io_counters()
    return io.read_bytes, io.write_bytes


class StepMeter:
    """Per-step storage traffic: call :meth:`tick` at the end of every step."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.last = io_counters()

    def tick(self) -> None:
        now = io_counters()
        self.cell.nvme_read_bytes.append(now[0] - self.last[0])
        self.cell.nvme_write_bytes.append(now[1] - self.last[1])
        self.last = now


def note(message: str) -> None:
    print(f"{MARK}{message}", flush=True)


# --- one cell, in its own process ------------------------------------------------------------------------


def run_tiertune(cell: Cell, work: Path) -> None:
    from tiertune.config import load_config
    from tiertune.launch.loop import run
    from tiertune.launch.progress import quiet_libraries

    quiet_libraries()
    tier = {"tiertune-ram": "device", "tiertune-host": "host", "tiertune-nvme": "nvme"}[cell.system]
    placement = [f"offload.params={tier}", f"offload.optimizer={tier}"]
    if tier == "nvme":
        placement.append(f"offload.nvme_dir=[{cell.nvme_dir}]")
    cfg = load_config(None, [*job_overrides(cell, work / "run"), *placement])
    meter = StepMeter(cell)

    def log(row: dict) -> None:
        meter.tick()
        cell.step_s.append(row["step_time_s"])
        cell.losses.append(row["loss"])
        cell.tokens_per_step = int(round(row["tokens_per_s"] * row["step_time_s"]))
        note(f"step {row['step']}/{cell.steps}: loss {row['loss']:.4f}, {row['step_time_s']:.2f}s")

    summary = run(cfg, callbacks=[log])
    cell.peak_device_bytes = summary.peak_device_bytes


def baseline_model(cfg, splits):
    """The module tiertune trains for ``cfg``, built whole in memory: the base from its seed, the tuning
    method applied (LoRA's adapters drawn from the seeded RNG as tiertune draws them), a LUC base
    compressed by the policy tiertune measures on the same rows."""
    import torch

    from tiertune.launch.luc_job import job_policy, uses_luc
    from tiertune.launch.models import WEIGHT_DTYPES, cast_parameters, materialize, skeleton, weight_source
    from tiertune.tuning import get_method
    from tiertune.tuning.luc.apply import compress_layers

    torch.manual_seed(cfg.train.seed)
    model = get_method(cfg.tuning.method).apply(skeleton(cfg.model), cfg.tuning)
    if uses_luc(cfg):
        compress_layers(model, job_policy(cfg, None, splits.train), WEIGHT_DTYPES[cfg.train.dtype])
    model = cast_parameters(model, WEIGHT_DTYPES[cfg.train.dtype])
    materialize(model, weight_source(cfg.model, cfg.train.seed, model))
    return model


def method_start(cfg) -> dict:
    """The initial values of what a tuning method adds to the base (nothing for ``full``), by parameter
    name, as :func:`baseline_model` makes them, without making the base."""
    import torch

    from tiertune.launch.models import materialize, skeleton, weight_source
    from tiertune.tuning import get_method

    if cfg.tuning.method == "full":
        return {}
    torch.manual_seed(cfg.train.seed)
    model = get_method(cfg.tuning.method).apply(skeleton(cfg.model), cfg.tuning)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    meta = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in trainable.items() if p.is_meta}
    made = materialize(model, weight_source(cfg.model, cfg.train.seed, model), only=meta) if meta else {}
    return {n: made.get(n, p).detach().clone() for n, p in trainable.items()}


def run_pytorch(cell: Cell, work: Path) -> None:
    import torch

    from tiertune.config import load_config
    from tiertune.launch.data import BatchStream, build_splits, count_targets
    from tiertune.launch.engine import loss_sum
    from tiertune.launch.models import load_tokenizer
    from tiertune.launch.progress import quiet_libraries
    from tiertune.optim import lr_at, param_groups

    quiet_libraries()
    cfg = load_config(None, job_overrides(cell, work / "run"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = build_splits(cfg.data, load_tokenizer(cfg.model), cfg.train.seed)
    model = baseline_model(cfg, splits).to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(
        param_groups(named, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True
    )
    stream = BatchStream(splits.train, cfg.train.micro_batch_size, cfg.train.seed)
    meter = StepMeter(cell)
    for step in range(1, cell.steps + 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in stream.next_batch().items()}
        targets = count_targets(batch["labels"])
        loss = loss_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        (loss / targets).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], o.max_grad_norm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o, cfg.train.max_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach()) / targets
        elapsed = time.perf_counter() - t0
        meter.tick()
        cell.step_s.append(elapsed)
        cell.losses.append(value)
        cell.tokens_per_step = int(batch["input_ids"].numel())
        note(f"step {step}/{cell.steps}: loss {value:.4f}, {elapsed:.2f}s")
    if device.type == "cuda":
        cell.peak_device_bytes = torch.cuda.max_memory_allocated()


def deepspeed_config(cell: Cell, cfg, largest: int) -> dict:
    stage = 2 if cell.system == "ds-zero2-cpu" else 3
    where = "nvme" if cell.system.endswith("nvme") else "cpu"
    offload = {"device": where, "pin_memory": False}
    if where == "nvme":
        offload = {"device": "nvme", "nvme_path": cell.nvme_dir, "pin_memory": True}
    zero: dict = {"stage": stage, "offload_optimizer": dict(offload)}
    if stage == 3:
        zero["sub_group_size"] = cell.ds_sub_group_size
        zero["offload_param"] = dict(offload)
        if where == "nvme":  # the smallest swap buffers DeepSpeed accepts: the largest parameter's size
            zero["offload_param"].update(buffer_count=5, buffer_size=largest)
    return {
        "train_micro_batch_size_per_gpu": cell.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_optimization": zero,
        "aio": dict(AIO),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Unavailable(RuntimeError):
    """The system cannot run here (the message says what is missing)."""


def run_deepspeed(cell: Cell, work: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0")
    os.environ["WORLD_SIZE"] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise Unavailable(f"DeepSpeed is not installed ({e})") from None
    import torch

    from tiertune.config import load_config
    from tiertune.errors import ConfigError
    from tiertune.launch.data import BatchStream, build_splits, count_targets
    from tiertune.launch.engine import loss_sum
    from tiertune.launch.models import base_name, hf_config, init_parameter, load_tokenizer
    from tiertune.launch.progress import quiet_libraries
    from tiertune.optim import lr_at, param_groups
    from tiertune.optim.kernels import load_deepspeed_cpu_adam
    from tiertune.tuning import get_method

    quiet_libraries()
    if cell.system.endswith("nvme"):
        from tiertune.offload.io import IOBackendUnavailable, load_deepspeed_aio

        try:
            load_deepspeed_aio()
        except IOBackendUnavailable as e:
            raise Unavailable(str(e)) from None
    try:
        load_deepspeed_cpu_adam()
    except ConfigError as e:
        raise Unavailable("; ".join(e.problems)) from None
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cfg = load_config(None, job_overrides(cell, work / "run"))
    deepspeed.init_distributed(verbose=False)
    splits = build_splits(cfg.data, load_tokenizer(cfg.model), cfg.train.seed)
    config = hf_config(cfg.model)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        largest = max(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    ds_config = deepspeed_config(cell, cfg, largest)
    torch.manual_seed(cfg.train.seed)
    if ds_config["zero_optimization"]["stage"] == 3:
        if cell.method == "luc_lora":
            raise Unavailable("ZeRO-3 partitions float parameters; a LUC base's compressed tensors are not")
        # As transformers builds a model for ZeRO-3: inside zero.Init, every parameter partitioned (to the
        # CPU or NVMe) as it is made, then each seeded as tiertune seeds it, gathered one at a time.
        from transformers.integrations import HfDeepSpeedConfig

        start = method_start(cfg)  # before the config is registered: transformers would use zero.Init
        registered = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds a weak reference)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        std = getattr(model.config, "initializer_range", 0.02)
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                init_parameter(base_name(name), p.data, cfg.train.seed, std)
        model = get_method(cfg.tuning.method).apply(model, cfg.tuning)
        # What the method adds (LoRA's adapters, S2A's modules) starts as tiertune starts it: made on a
        # skeleton of the base (no memory), then copied in by name.
        for name, value in start.items():
            p = model.get_parameter(name)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(value)
    else:
        model = baseline_model(cfg, splits)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = DeepSpeedCPUAdam(
        param_groups(named, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    stream = BatchStream(splits.train, cfg.train.micro_batch_size, cfg.train.seed)
    engine.train()
    meter = StepMeter(cell)
    for step in range(1, cell.steps + 1):
        t0 = time.perf_counter()
        batch = stream.next_batch()
        targets = count_targets(batch["labels"])
        loss = loss_sum(engine(input_ids=batch["input_ids"]).logits, batch["labels"])
        engine.backward(loss / targets)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(step, o, cfg.train.max_steps)
        engine.step()
        elapsed = time.perf_counter() - t0
        value = float(loss.detach()) / targets
        meter.tick()
        cell.step_s.append(elapsed)
        cell.losses.append(value)
        cell.tokens_per_step = int(batch["input_ids"].numel())
        note(f"step {step}/{cell.steps}: loss {value:.4f}, {elapsed:.2f}s")


def run_cell(cell: Cell, work: Path) -> None:
    from tiertune.memory import peak_rss_bytes

    started = time.perf_counter()
    try:
        if cell.system == "pytorch":
            run_pytorch(cell, work)
        elif cell.system.startswith("tiertune"):
            run_tiertune(cell, work)
        else:
            run_deepspeed(cell, work)
    except Unavailable as e:
        cell.status, cell.reason = "skipped", str(e)
    cell.peak_rss_bytes = peak_rss_bytes()
    cell.wall_s = time.perf_counter() - started
    (work / "cell.json").write_text(json.dumps(asdict(cell)))


# --- the parent: every cell in turn, then the table --------------------------------------------------------


def spawn(cell: Cell, work: Path, timeout_s: float) -> Cell:
    """Run ``cell`` in its own process; a process that dies (killed for memory, an assertion) is a
    failed cell with the reason, never the end of the matrix."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--cell",
        json.dumps(asdict(cell)),
        "--work",
        str(work),
    ]
    log = work / "log.txt"
    tail: list[str] = []
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        for line in proc.stdout:
            fh.write(line)
            tail = (tail + [line.rstrip()])[-30:]
            if line.startswith(MARK):
                print(f"      {line[len(MARK) :].rstrip()}", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
        proc.wait()
    result = work / "cell.json"
    if proc.returncode == 0 and result.exists():
        return Cell(**json.loads(result.read_text()))
    if proc.returncode == -9:
        why = "killed (SIGKILL: out of memory, or over --timeout-s)"
    elif proc.returncode < 0:
        why = f"died by signal {-proc.returncode}"
    else:
        errors = [t for t in tail if "Error" in t or "error" in t]
        why = f"exit status {proc.returncode}: {(errors or tail or [''])[-1][:300]}"
    cell.status, cell.reason = "failed", why
    return cell


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def machine() -> str:
    import psutil
    import torch

    mem = psutil.virtual_memory().total / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem:.1f} GiB RAM, {gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def table(cells: list[Cell], command: str, when: str) -> str:
    lines = [
        f"Machine: {machine()}. Run {when}: `{command}`",
        "",
        "Median step time after warm-up; IQR: the interquartile range of a cell's timed steps over their "
        "median (a step-time ratio whose distance from 1 is within the IQRs of its two cells is noise); "
        "ratios against plain PyTorch on the same row (x pt: below 1 is faster / smaller); NVMe MiB read and "
        "written per step; loss gap: the largest difference of any step's loss from PyTorch's.",
        "",
        "| model | method | system | placement | steps | step s | IQR | x pt | tok/s | peak RSS MiB | x pt | "
        "device MiB | NVMe read | NVMe write | loss gap | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (size, method), row in _rows(cells).items():
        ref = row.get("pytorch")
        for c in row.values():
            if c.status != "ok":
                lines.append(
                    f"| {size} | {method} | {c.system} | {PLACEMENT[c.system]} | - | - | - | - | - | - | - | - "
                    f"| - | - | - | {c.status}: {c.reason.replace('|', '/')} |"
                )
                continue
            step = c.median_step_s
            ok_ref = ref is not None and ref.status == "ok"
            x_step = f"{step / ref.median_step_s:.2f}" if ok_ref and step else "-"
            x_rss = f"{c.peak_rss_bytes / ref.peak_rss_bytes:.2f}" if ok_ref else "-"
            gap = (
                f"{max(abs(a - b) for a, b in zip(c.losses, ref.losses)):.1e}"
                if ok_ref and c.losses and ref.losses
                else "-"
            )
            spread = c.step_spread
            timed = f"{c.steps - c.warmup} of {c.steps}"
            lines.append(
                f"| {size} | {method} | {c.system} | {PLACEMENT[c.system]} | {timed} | {step:.3f} | "
                f"{'-' if spread is None else f'{spread:.0%}'} | {x_step} | "
                f"{c.tokens_per_step / step:,.0f} | {mib(c.peak_rss_bytes)} | {x_rss} | "
                f"{mib(c.peak_device_bytes)} | {mib(c.median_io(c.nvme_read_bytes))} | "
                f"{mib(c.median_io(c.nvme_write_bytes))} | {gap} | |"
            )
    # the head-to-head ratios users ask for: tiertune against the DeepSpeed mode of the same placement
    pairs = (
        ("tiertune-nvme", "ds-zero3-nvme"),
        ("tiertune-host", "ds-zero2-cpu"),
        ("tiertune-host", "ds-zero3-cpu"),
    )
    head = ["", "| model | method | tiertune / DeepSpeed | step | peak RSS |", "|---|---|---|---|---|"]
    for (size, method), row in _rows(cells).items():
        for ours, theirs in pairs:
            a = row.get(ours)
            if a is not None and a.status == "skipped" and ours == "tiertune-host":
                a = row.get("tiertune-ram")  # without an accelerator host is ram
            b = row.get(theirs)
            if a and b and a.status == b.status == "ok" and a.median_step_s and b.median_step_s:
                head.append(
                    f"| {size} | {method} | {a.system} / {theirs} | {a.median_step_s / b.median_step_s:.2f} | "
                    f"{a.peak_rss_bytes / b.peak_rss_bytes:.2f} |"
                )
    return "\n".join(lines + head) + "\n"


def _rows(cells: list[Cell]) -> dict[tuple[str, str], dict[str, Cell]]:
    rows: dict[tuple[str, str], dict[str, Cell]] = {}
    for c in cells:
        rows.setdefault((c.size, c.method), {})[c.system] = c
    return rows


def plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(cells)
    systems = [s for s in SYSTEMS if any(s in r and r[s].status == "ok" for r in rows.values())]
    colors = {s: f"C{i}" for i, s in enumerate(SYSTEMS)}  # a system keeps its colour in every plot
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(rows)), 8), sharex=True)
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs, steps, low, high, rss = [], [], [], [], []
        for j, row in enumerate(rows.values()):
            c = row.get(system)
            if c is not None and c.status == "ok" and c.median_step_s:
                xs.append(j + i * width)
                steps.append(c.median_step_s)
                q1, q3 = c.step_quartiles
                low.append(c.median_step_s - q1)
                high.append(q3 - c.median_step_s)
                rss.append(c.peak_rss_bytes / 2**30)
        axes[0].bar(xs, steps, width, yerr=[low, high], capsize=2, label=system, color=colors[system])
        axes[1].bar(xs, rss, width, label=system, color=colors[system])
    axes[0].set_ylabel("median step (s, log; bars: quartiles)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("peak RSS (GiB)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    axes[1].set_xticklabels([f"{s}\n{m}" for s, m in rows], fontsize=8)
    axes[0].legend(fontsize=8, ncol=4)
    axes[0].set_title("tiertune, plain PyTorch and DeepSpeed: the same job per group")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def planned_cells(args: argparse.Namespace) -> list[Cell]:
    import torch

    from tiertune.config import ModelConfig
    from tiertune.launch.models import skeleton

    accel = torch.cuda.is_available()
    cells = []
    for size in args.sizes:
        big = sum(p.numel() for p in skeleton(ModelConfig(preset=size)).parameters()) > BIG_PARAMS
        micro_batch = args.micro_batch if args.micro_batch is not None else 1 if big else 4
        steps = args.steps if args.steps is not None else BIG_STEPS if big else SMALL_STEPS
        warmup = args.warmup if args.warmup is not None else BIG_WARMUP if big else SMALL_WARMUP
        if steps <= warmup:
            raise SystemExit(f"matrix.py: --steps ({steps}) must be more than --warmup ({warmup}) for {size}")
        methods = (
            args.methods
            if args.all_methods or size != SIZES[-1]
            else [m for m in args.methods if m in BIG_METHODS]
        )
        for method in methods:
            for system in args.systems:
                cell = Cell(
                    size, method, system, steps, warmup, micro_batch, args.seq_len, "",
                    int(args.ds_sub_group_size),
                )  # fmt: skip
                if system == "tiertune-host" and not accel:
                    cell.status = "skipped"
                    cell.reason = (
                        "without an accelerator the device tier is host memory: the plan of tiertune-ram"
                    )
                cells.append(cell)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    listed = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    parser.add_argument(
        "--sizes", type=listed, default=list(SIZES), help=f"presets (default {','.join(SIZES)})"
    )
    parser.add_argument("--methods", type=listed, default=list(METHODS))
    parser.add_argument("--systems", type=listed, default=list(SYSTEMS))
    parser.add_argument(
        "--all-methods", action="store_true", help=f"also the methods beyond {BIG_METHODS} on the last size"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per cell (default {SMALL_STEPS}, or {BIG_STEPS} for presets above 500M parameters)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"the first steps, not timed (default {SMALL_WARMUP}, or {BIG_WARMUP} above 500M parameters)",
    )
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="default: 4, or 1 for presets above 500M parameters"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "matrix"))
    parser.add_argument("--nvme-dir", default=None, help="where the NVMe systems put their files")
    parser.add_argument("--timeout-s", type=float, default=1800, help="a cell running longer is killed")
    parser.add_argument(
        "--ds-sub-group-size",
        type=float,
        default=1e9,
        help="ZeRO-3's sub_group_size: the parameters whose optimizer state its step holds at a time "
        "(default DeepSpeed's 1e9)",
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        run_cell(Cell(**json.loads(args.cell)), Path(args.work))
        return
    for name, given, known in (("--methods", args.methods, METHODS), ("--systems", args.systems, SYSTEMS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    from tiertune.launch.presets import PRESETS

    missing = [s for s in args.sizes if s not in PRESETS]
    if missing:
        parser.error(f"--sizes: {', '.join(missing)} is not a preset (see `tiertune presets`)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/matrix.py", *(shlex.quote(a) for a in sys.argv[1:])])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cells = planned_cells(args)
    done: list[Cell] = []
    with tempfile.TemporaryDirectory(dir=args.nvme_dir, prefix="tiertune-matrix-") as tmp:
        for i, cell in enumerate(cells, 1):
            label = f"[{i}/{len(cells)}] {cell.size} {cell.method} {cell.system}"
            if cell.status == "skipped":
                print(f"{label}: skipped ({cell.reason})", flush=True)
                done.append(cell)
                continue
            work = Path(tmp) / f"cell-{i}"
            cell.nvme_dir = str(work / "nvme")
            Path(cell.nvme_dir).mkdir(parents=True)
            print(f"{label}: started", flush=True)
            result = spawn(cell, work, args.timeout_s)
            if result.status == "ok":
                print(
                    f"{label}: median step {result.median_step_s:.3f}s, peak RSS {mib(result.peak_rss_bytes)} MiB "
                    f"({result.wall_s:.0f}s)",
                    flush=True,
                )
            else:
                print(f"{label}: {result.status}: {result.reason}", flush=True)
            done.append(result)
            # written after every cell: a matrix stopped half way keeps what it measured
            (out / "matrix.json").write_text(
                json.dumps(
                    {
                        "machine": machine(),
                        "command": command,
                        "when": when,
                        "cells": [asdict(c) for c in done],
                    },
                    indent=1,
                )
                + "\n"
            )
    text = table(done, command, when)
    (out / "matrix.md").write_text(text)
    plot(done, out / "matrix.png")
    print()
    print(text)
    print(f"saved {out / 'matrix.json'}, {out / 'matrix.md'}, {out / 'matrix.png'}")


if __name__ == "__main__":
    main()
