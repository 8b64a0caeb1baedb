"""tiertune against DeepSpeed ZeRO-Infinity: weights and optimizer state on NVMe, the same job on both.

    bash scripts/venv-run python benchmarks/zero_infinity.py [--preset small-llama] [--steps 6] [--repeats 2]
                                                            [--micro-batch 8] [--seq-len 128]
                                                            [--dtype fp32|bf16] [--tiertune-host-gib G]
                                                            [--nvme-dir DIR] [--json PATH]

One seeded job (the preset's weights, initialised parameter by parameter from the seed, the same token
batches in the same order, AdamW with the same lr schedule, betas, eps, weight decay and gradient
clipping, in fp32, or with ``--dtype bf16`` bf16 weights and gradients with fp32 masters and moments:
DeepSpeed's ``bf16`` mode, tiertune's ``train.dtype=bf16``) trains on two systems, alternating (deepspeed, tiertune, deepspeed, ...) so that machine noise
hits both:

- deepspeed: ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on NVMe (ZeRO-Infinity), its CPU Adam
  (``DeepSpeedCPUAdam``) and its libaio async_io op, one process (world size 1, the gloo backend); the
  model is built as transformers builds it for ZeRO-3, inside ``deepspeed.zero.Init`` with each parameter
  partitioned to NVMe as it is made, so it never exists whole in memory either;
- tiertune: ``offload.params=nvme offload.optimizer=nvme`` through its own training loop; or, with
  ``--tiertune-host-gib G``, wherever its planner puts the state within a host memory budget of G GiB
  (``memory.host_budget_gib``; what does not fit goes to NVMe), the way a job would run it.

Every run is a process of its own, so its peak RSS (VmHWM) is its own. It prints the median step time
(the first two steps of each run are warm-up and not counted), the peak RSS of each system and the ratios
tiertune/deepspeed, the losses of the first steps of both (the same model on the same data: they agree
to a few decimals; DeepSpeed's Adam rounds differently in the last bits), and where DeepSpeed's step time
goes (forward, backward, optimizer step). ``--nvme-dir`` puts both systems' NVMe files on a particular
drive (default: a temporary directory); ``--json PATH`` saves every run's figures.

DeepSpeed's ops are compiled on first use into ``$TORCH_EXTENSIONS_DIR`` (default: the environment's
``torch_extensions``, where tiertune's deepspeed I/O backend builds async_io): the first run also
compiles cpu_adam, a few minutes once. Without DeepSpeed, libaio's headers or a compiler it says what is
missing and exits 2.

DeepSpeed's settings are its documented defaults (aio: 1 MiB blocks, queue depth 8, one thread, overlapped
events) but for the parameter swap buffers: ``offload_param.buffer_size`` (default 1e8 elements, five
pinned buffers: 2 GB) is sized to the largest parameter, the smallest DeepSpeed accepts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _deepspeed import AIO, free_port  # benchmarks/, the script's own directory
from _timing import TIMED_JOB

from tiertune.config import JobConfig

SYSTEMS = ("deepspeed", "tiertune")
WARMUP = 2  # steps of each run not timed
MARK = "zero_infinity: "  # the child's lines the parent passes on
MISSING = 2  # exit status: DeepSpeed or one of its ops is not available here


def job(args: argparse.Namespace, out: Path) -> list[str]:
    """The job both systems train, as tiertune overrides."""
    return [
        *TIMED_JOB,
        f"model.preset={args.preset}",
        f"train.micro_batch_size={args.micro_batch}",
        f"data.seq_len={args.seq_len}",
        f"train.max_steps={args.steps}",
        f"train.dtype={args.dtype}",
        "train.device=cpu",  # where DeepSpeed's CPU accelerator runs it
        f"output_dir={out}",
    ]


def note(message: str) -> None:
    print(f"{MARK}{message}", flush=True)


# --- the runs, each in a child process -----------------------------------------------------------------


def run_tiertune(args: argparse.Namespace, work: Path, store: Path) -> dict:
    from tiertune.config import load_config
    from tiertune.launch.loop import run
    from tiertune.launch.progress import quiet_libraries

    quiet_libraries()
    if args.tiertune_host_gib is None:
        placement = ["offload.params=nvme", "offload.optimizer=nvme"]
    else:
        placement = [f"memory.host_budget_gib={args.tiertune_host_gib}"]
    cfg = load_config(None, [*job(args, work / "run"), *placement, f"offload.nvme_dir=[{store}]"])
    rows: list[dict] = []
    on_drive = [0]  # the store's files, measured as DeepSpeed's are (they go when the run ends)

    def log(row: dict) -> None:
        rows.append(row)
        on_drive[0] = max(on_drive[0], sum(f.stat().st_size for f in store.rglob("*") if f.is_file()))
        note(f"step {row['step']}/{args.steps}: loss {row['loss']:.4f}, {row['step_time_s']:.2f}s")

    run(cfg, callbacks=[log])
    return {
        "step_s": [r["step_time_s"] for r in rows],
        "losses": [r["loss"] for r in rows],
        "nvme_bytes": on_drive[0],
    }


def deepspeed_config(args: argparse.Namespace, cfg: JobConfig, store: Path, largest: int) -> dict:
    """ZeRO-Infinity for the job ``cfg``; ``largest``: the elements of the model's largest parameter."""
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "fp16": {"enabled": False},
        "bf16": {"enabled": args.dtype == "bf16"},
        "zero_optimization": {
            "stage": 3,
            # DeepSpeed's default: the optimizer step swaps in (and pins buffers for) a sub-group of this
            # many elements at a time, so below 1e9 parameters the whole model's state is in RAM for it.
            "sub_group_size": 10**9,
            "offload_param": {
                "device": "nvme",
                "nvme_path": str(store),
                "pin_memory": True,
                "buffer_count": 5,
                "buffer_size": largest,
            },
            "offload_optimizer": {"device": "nvme", "nvme_path": str(store), "pin_memory": True},
        },
        "aio": dict(AIO),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Missing(RuntimeError):
    """DeepSpeed, or one of the ops ZeRO-Infinity needs, cannot run here (the message says what)."""


def deepspeed_ops() -> None:
    """Import DeepSpeed and build (or load) async_io and cpu_adam, or say what is missing."""
    from tiertune.offload.io import IOBackendUnavailable, load_deepspeed_aio

    try:
        load_deepspeed_aio()  # also clears a dead build's lock in TORCH_EXTENSIONS_DIR
    except IOBackendUnavailable as e:
        raise Missing(str(e).replace("offload.io_backend=deepspeed: ", "")) from None
    from tiertune.errors import ConfigError
    from tiertune.optim.kernels import load_deepspeed_cpu_adam

    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "cpu_adam" / "cpu_adam.so"
    if not built.exists():
        note("building DeepSpeed's cpu_adam op (a few minutes, once; do not interrupt it)")
    try:
        load_deepspeed_cpu_adam()
    except ConfigError as e:
        raise Missing("; ".join(e.problems).replace("optim.kernel=deepspeed: ", "")) from None


def run_deepspeed(args: argparse.Namespace, work: Path, store: Path) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0")
    os.environ["WORLD_SIZE"] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise Missing(
            f"DeepSpeed is not installed ({e}); `pip install --no-build-isolation deepspeed`"
        ) from None
    deepspeed_ops()
    import random

    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from tiertune.config import load_config
    from tiertune.launch.data import BatchStream, build_splits, count_targets
    from tiertune.launch.engine import loss_sum
    from tiertune.launch.models import base_name, hf_config, init_parameter, load_tokenizer
    from tiertune.launch.progress import quiet_libraries
    from tiertune.optim import lr_at, param_groups

    quiet_libraries()
    cfg = load_config(None, job(args, work / "run"))
    deepspeed.init_distributed(verbose=False)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    config = hf_config(cfg.model)
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config)
    largest = max(p.numel() for p in shapes.parameters())
    del shapes
    ds_config = deepspeed_config(args, cfg, store, largest)
    zero = ds_config["zero_optimization"]
    note(
        f"state: ZeRO-3, params and optimizer state on NVMe in {store}; param swap buffers "
        f"{zero['offload_param']['buffer_count']} x {largest:,} elements, "
        f"sub_group_size {zero['sub_group_size']:,}"
    )
    # As the HF integration does it: with the config registered, transformers builds the model inside
    # deepspeed.zero.Init (its init skipped), each parameter partitioned straight to NVMe as it is made;
    # then each is seeded as tiertune seeds it, by its name, gathered one at a time.
    registered = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds it by a weak reference)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32
    )
    std = getattr(model.config, "initializer_range", 0.02)
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            init_parameter(base_name(name), p.data, cfg.train.seed, std)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = DeepSpeedCPUAdam(
        param_groups(named, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        adamw_mode=True,
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    tokenizer = load_tokenizer(cfg.model)
    splits = build_splits(cfg.data, tokenizer, cfg.train.seed)
    stream = BatchStream(splits.train, cfg.train.micro_batch_size, cfg.train.seed)
    steps: list[float] = []
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer step": []}
    losses: list[float] = []
    engine.train()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        batch = stream.next_batch()
        targets = count_targets(batch["labels"])
        loss = loss_sum(engine(input_ids=batch["input_ids"]).logits, batch["labels"])
        t1 = time.perf_counter()
        engine.backward(loss / targets)
        t2 = time.perf_counter()
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.optim, cfg.train.max_steps)
        engine.step()
        t3 = time.perf_counter()
        steps.append(t3 - t0)
        for key, span in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[key].append(span)
        losses.append(float(loss.detach()) / targets)
        note(f"step {step}/{args.steps}: loss {losses[-1]:.4f}, {steps[-1]:.2f}s")
    on_drive = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {"step_s": steps, "losses": losses, "phases_s": phases, "nvme_bytes": on_drive}


def child(args: argparse.Namespace) -> None:
    from tiertune.memory import peak_rss_bytes

    work = Path(args.work)
    store = work / "nvme"
    store.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        result = (run_deepspeed if args.child == "deepspeed" else run_tiertune)(args, work, store)
    except Missing as e:
        note(f"error: {e}")
        raise SystemExit(MISSING) from None
    result.update(peak_rss_bytes=peak_rss_bytes(), wall_s=time.perf_counter() - started)
    (work / "result.json").write_text(json.dumps(result))


# --- the parent: alternate the runs, then compare ------------------------------------------------------


def spawn(args: argparse.Namespace, system: str, work: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--child={system}",
        f"--work={work}",
        f"--preset={args.preset}",
        f"--steps={args.steps}",
        f"--micro-batch={args.micro_batch}",
        f"--seq-len={args.seq_len}",
        f"--dtype={args.dtype}",
    ]
    if args.tiertune_host_gib is not None:
        cmd.append(f"--tiertune-host-gib={args.tiertune_host_gib}")
    env = dict(os.environ)
    # Where tiertune's deepspeed I/O backend builds DeepSpeed's ops: built once, reused by every run.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.setdefault("DS_ACCELERATOR", "cpu")
    work.mkdir(parents=True)
    log = work / "log.txt"
    with (
        open(log, "w") as fh,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc,
    ):
        for line in proc.stdout:
            fh.write(line)
            if line.startswith(MARK):
                print(f"    {line[len(MARK) :].rstrip()}", flush=True)
            elif line.startswith("tiertune: state:"):  # where the plan put everything
                print(f"    {line.removeprefix('tiertune: ').rstrip()}", flush=True)
    if proc.returncode == MISSING:
        print(f"{system} cannot run here; nothing was measured")
        raise SystemExit(MISSING)
    if proc.returncode != 0:
        print("\n".join(log.read_text().splitlines()[-40:]))
        raise SystemExit(f"the {system} run failed with exit status {proc.returncode}")
    return json.loads((work / "result.json").read_text())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small-llama")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--tiertune-host-gib", type=float, default=None, metavar="G")
    parser.add_argument("--nvme-dir", default=None)
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    runs: dict[str, list[dict]] = {name: [] for name in SYSTEMS}
    with tempfile.TemporaryDirectory(dir=args.nvme_dir) as tmp:
        for r in range(args.repeats):
            for name in SYSTEMS:
                print(f"round {r + 1}/{args.repeats}: {name} started", flush=True)
                res = spawn(args, name, Path(tmp) / f"{name}-{r}")
                print(
                    f"round {r + 1}/{args.repeats}: {name} done in {res['wall_s']:.0f}s, "
                    f"peak RSS {gib(res['peak_rss_bytes'])}",
                    flush=True,
                )
                runs[name].append(res)
    step = {n: statistics.median(t for run in rs for t in run["step_s"][WARMUP:]) for n, rs in runs.items()}
    rss = {n: statistics.median(run["peak_rss_bytes"] for run in rs) for n, rs in runs.items()}
    timed = (args.steps - WARMUP) * args.repeats
    where = "weights and optimizer state on NVMe"
    if args.tiertune_host_gib is not None:
        where = (
            f"deepspeed: {where}, tiertune: as planned within {args.tiertune_host_gib:g} GiB of host memory"
        )
    print(
        f"{args.preset}, micro-batch {args.micro_batch} x {args.seq_len}, {args.dtype}, {where}; "
        f"{timed} timed steps each ({args.repeats} runs of {args.steps}, {WARMUP} warm-up)"
    )
    print(f"  {'':10} {'median step':>12} {'peak RSS':>10} {'on NVMe':>10}")
    for n in SYSTEMS:
        print(f"  {n:10} {step[n] * 1e3:9.1f} ms {gib(rss[n]):>10} {gib(runs[n][0]['nvme_bytes']):>10}")
    ratio_step, ratio_rss = step["tiertune"] / step["deepspeed"], rss["tiertune"] / rss["deepspeed"]
    print(f"  ratio tiertune/deepspeed   step {ratio_step:.3f}   peak RSS {ratio_rss:.3f}")
    phases = {
        k: statistics.median(t for run in runs["deepspeed"] for t in run["phases_s"][k][WARMUP:])
        for k in runs["deepspeed"][0]["phases_s"]
    }
    print("  deepspeed's step: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in phases.items()))
    first = min(args.steps, 4)
    print(f"  losses, first {first} steps (round 1):")
    for n in SYSTEMS:
        print(f"    {n:10} " + " ".join(f"{x:.5f}" for x in runs[n][0]["losses"][:first]))
    gap = max(abs(a - b) for a, b in zip(runs["deepspeed"][0]["losses"], runs["tiertune"][0]["losses"]))
    print(f"  largest loss difference over {args.steps} steps: {gap:.2e}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "preset": args.preset,
                    "micro_batch": args.micro_batch,
                    "seq_len": args.seq_len,
                    "dtype": args.dtype,
                    "tiertune_host_gib": args.tiertune_host_gib,
                    "steps": args.steps,
                    "warmup_steps": WARMUP,
                    "median_step_s": step,
                    "peak_rss_bytes": rss,
                    "ratio_tiertune_over_deepspeed": {"step": ratio_step, "peak_rss": ratio_rss},
                    "runs": runs,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"  saved {args.json}")


if __name__ == "__main__":
    main()
