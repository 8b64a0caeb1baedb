"""LUC in a job: the policy's measurements on the job's own data, its budget from ``tuning.luc.*``, and
where it is kept (``<output_dir>/luc_policy.json``: a resumed run compresses its base exactly as before,
and ``tuning.luc.policy`` reuses one)."""

from __future__ import annotations

from pathlib import Path

from tiertune.config import JobConfig
from tiertune.errors import ConfigError
from tiertune.launch.data import PackedRows
from tiertune.launch.models import WEIGHT_DTYPES, skeleton, weight_source
from tiertune.launch.progress import say
from tiertune.tuning.luc import InfeasibleBudget, Policy, Setting, profile, solve, stored_bytes

__all__ = [
    "POLICY_FILE",
    "Policy",
    "job_policy",
    "measure_policy",
    "policy_fingerprint",
    "settings",
    "uses_luc",
]

POLICY_FILE = "luc_policy.json"


def uses_luc(cfg: JobConfig) -> bool:
    return cfg.tuning.method == "luc_lora"


def settings(cfg: JobConfig) -> list[Setting]:
    """Every (bits, sparsity) a layer may get. Pruned settings only when the budget asks for sparsity:
    otherwise they only cost accuracy and the solver would never choose them."""
    luc = cfg.tuning.luc
    ratios = sorted(set(luc.sparsity_choices)) if luc.sparsity > 0 else [0.0]
    return [
        Setting(b, 0.0 if b == 16 else s)
        for b in sorted(set(luc.bits_choices))
        for s in ratios
        if b != 16 or s == 0
    ]


def job_policy(cfg: JobConfig, out: Path | None, train: PackedRows) -> Policy:
    """The policy ``tuning.luc.policy`` names, else the one this run saved (on resume), else a new one
    measured on the first ``tuning.luc.calibration_batches`` micro-batches of ``train``."""
    named = Path(cfg.tuning.luc.policy) if cfg.tuning.luc.policy else None
    saved = out / POLICY_FILE if out is not None else None
    for path in (named, saved if saved is not None and saved.is_file() else None):
        if path is None:
            continue
        try:
            policy = Policy.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                [f"tuning.luc.policy: cannot read a LUC policy from {path} ({type(e).__name__}: {e})"]
            ) from None
        say(f"LUC policy from {path}")
        return policy
    return measure_policy(cfg, train)


def measure_policy(cfg: JobConfig, train: PackedRows) -> Policy:
    luc = cfg.tuning.luc
    rows = min(len(train), luc.calibration_batches * cfg.train.micro_batch_size)
    if rows == 0:
        raise ConfigError(["tuning.luc: the training split has no rows to calibrate on"])
    batches = list(train.input_ids[:rows].split(cfg.train.micro_batch_size))
    model = skeleton(cfg.model)  # the weights are compressed from their fp32 values
    options = settings(cfg)
    say(f"LUC: measuring each layer's sensitivity to {len(options)} settings on {rows} sequences")
    measured = profile(
        model,
        weight_source(cfg.model, cfg.train.seed, model),
        batches,
        options,
        luc.group_size,
        on_layer=lambda done, total: (
            say(f"LUC: {done}/{total} layer-batches measured") if done % max(1, total // 4) == 0 else None
        ),
    )
    meta_bytes = WEIGHT_DTYPES[cfg.train.dtype].itemsize

    def stored(layer: str, setting: Setting) -> int:
        return stored_bytes(measured.shapes[layer], setting, luc.group_size, meta_bytes)

    dense = sum(stored(n, Setting(16)) for n in measured.shapes)
    try:
        layers = solve(
            measured.errors,
            measured.params,
            avg_bits=None if luc.max_bytes_ratio is not None else luc.avg_bits,
            sparsity=luc.sparsity,
            max_bytes=None if luc.max_bytes_ratio is None else int(luc.max_bytes_ratio * dense),
            stored_bytes=stored,
        )
    except InfeasibleBudget as e:
        raise ConfigError(
            [
                f"tuning.luc: {e}; raise tuning.luc.avg_bits (or max_bytes_ratio), lower tuning.luc.sparsity, "
                "or allow more settings (bits_choices, sparsity_choices)"
            ]
        ) from None
    return Policy(
        group_size=luc.group_size,
        layers=layers,
        params=measured.params,
        errors={n: {s.label: e for s, e in per.items()} for n, per in measured.errors.items()},
        budget={
            "avg_bits": luc.avg_bits if luc.max_bytes_ratio is None else None,
            "max_bytes_ratio": luc.max_bytes_ratio,
            "sparsity": luc.sparsity,
        },
        stored_bytes=sum(stored(n, s) for n, s in layers.items()),
        dense_bytes=dense,
    )


def policy_fingerprint(policy: Policy) -> str:
    """What a checkpoint must agree on to resume: the settings per layer and the group size."""
    settings_ = ",".join(f"{n}:{s.bits}/{s.sparsity:g}" for n, s in policy.layers.items())
    return f"group {policy.group_size}; {settings_}"
