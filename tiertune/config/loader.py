"""Turn config files and ``key=value`` overrides into a validated :class:`JobConfig`.

Precedence: schema defaults < a DeepSpeed config the job names (``deepspeed``, mapped by
:mod:`tiertune.config.deepspeed`) < the config file < command-line overrides (later overrides win).
Every problem (unknown key, bad type, value out of range, cross-key conflict, missing file) is
collected and raised together as one :class:`ConfigError`, each naming its dotted key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from tiertune.config.deepspeed import Mapping, from_deepspeed, read_deepspeed
from tiertune.config.schema import JobConfig
from tiertune.errors import ConfigError, DataError, ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

_NULL_WORDS = {"null", "none", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read ``path`` (YAML or TOML; None for defaults only), apply ``overrides``, validate everything."""
    source = str(path) if path is not None else None
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    override_tree, problems = parse_overrides(overrides)
    merged = _deep_merge(raw, override_tree)
    if isinstance(merged.get("deepspeed"), str) and merged["deepspeed"].strip():
        mapping = deepspeed_mapping(merged["deepspeed"])
        merged = _deep_merge(mapping.tree(), merged)  # what the job says itself wins
        problems += [f"deepspeed ({merged['deepspeed']}): {p}" for p in mapping.problems]
    cfg, build_problems = build_dataclass(JobConfig, merged)
    problems += build_problems
    _apply_derived_defaults(cfg)
    # Cross-key and file checks run on what did build; a check that mentions a key that did not build
    # would be judging that key's default instead of what the user wrote, so it is left out.
    broken = {p.split(":", 1)[0].removeprefix("unknown key ").strip("'") for p in build_problems}
    problems += [
        p for p in cfg.cross_problems() + _environment_problems(cfg) if not any(k in p for k in broken)
    ]
    if not problems and cfg.model.task == "sequence_classification" and not cfg.model.labels:
        problems += _derive_labels(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def deepspeed_mapping(path: str | Path) -> Mapping:
    """The DeepSpeed config at ``path`` in this project's keys (``WORLD_SIZE``, torchrun's, checks its
    ``train_batch_size``)."""
    import os

    return from_deepspeed(read_deepspeed(path), ranks=int(os.environ.get("WORLD_SIZE", "1") or 1))


def _derive_labels(cfg: JobConfig) -> list[str]:
    """Fill ``model.labels`` from the dataset (its distinct labels, sorted); the problems found."""
    from tiertune.launch.data import dataset_labels, load_examples

    try:
        examples = load_examples(cfg.data)
    except DataError as e:  # its message names the file
        return [f"data.path: {e}"]
    try:
        cfg.model.labels = dataset_labels(examples)
    except DataError as e:
        return [f"data.path: {cfg.data.path!r}: {e}"]
    return []


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; check the path"], None)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read the config file: {e}"], str(path)) from None
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(
                [f"unknown config file type {path.suffix!r}; use .yaml, .yml or .toml"], str(path)
            )
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"not valid YAML{where}: {getattr(e, 'problem', e)}"], str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"the top level must be a mapping of sections, got {type(data).__name__}"], str(path)
        )
    return data


def parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``["optim.lr=3e-4", ...]`` -> a nested dict of raw strings, plus syntax problems."""
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r} is not of the form dotted.key=value")
            continue
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = _RawOverride(value)
    return tree, problems


class _RawOverride(str):
    """A command-line value: a string whose type is decided by the schema field it lands on."""


def build_dataclass(cls: type, data: Any, prefix: str = "") -> tuple[Any, list[str]]:
    """Build ``cls`` from a nested mapping, coercing each value to its field's type."""
    if data is None:  # a section whose keys are all commented out
        data = {}
    if not isinstance(data, dict):
        return cls(), [f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}"]
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            problems.append(_unknown_key_message(str(key), dotted, list(fields)))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, _RawOverride):
                problems.append(
                    f"{dotted} is a section; set one of its keys, e.g. {dotted}."
                    f"{dataclasses.fields(tp)[0].name}=..."
                )
                continue
            kwargs[key], sub = build_dataclass(tp, value, dotted + ".")
            problems += sub
            continue
        coerced, problem = _coerce(value, tp)
        if problem is not None:
            problems.append(
                f"{dotted}: {problem}, got {_show(value)}"
                if problem.startswith("expected")
                else f"{dotted}: {str(value)!r} {problem}"
            )
            continue
        check = fields[key].metadata.get("check")
        problem = check(coerced) if check is not None and coerced is not None else None
        if problem is not None:
            problems.append(f"{dotted}: {coerced!r} {problem}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs), problems


def _coerce(value: Any, tp: Any) -> tuple[Any, str | None]:
    """Return (value as type ``tp``, None) or (None, 'expected ...')."""
    raw = isinstance(value, _RawOverride)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) < len(args) and (value is None or (raw and value.strip().lower() in _NULL_WORDS)):
            return None, None
        # Fixed words first, so that 'auto' in `float | Literal["auto"]` is the word and not a bad number.
        for member in sorted(members, key=lambda m: get_origin(m) is not Literal):
            coerced, problem = _coerce(value, member)
            if problem is None:
                return coerced, None
        if len(members) == 1:
            return None, problem
        return None, "expected " + " or ".join(_describe(m) for m in members)
    if origin is Literal:
        choices = list(args)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/no/on/yes as a boolean
            words = _TRUE_WORDS if value else _FALSE_WORDS
            value = next((c for c in choices if str(c).lower() in words), value)
        elif raw:
            value = value.strip()
        if value in choices:
            return choices[choices.index(value)], None  # the schema's own object, not the raw string
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return None, f"is not allowed; choose one of: {', '.join(map(str, choices))}{hint}"
    if origin is list:
        if raw:
            if value.strip().startswith("["):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    return None, f"expected a list of {args[0].__name__} such as [a, b] or a,b"
            else:
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list):
                value = [_RawOverride(str(v)) for v in value]
        if not isinstance(value, list):
            return None, f"expected a list of {args[0].__name__}"
        out = []
        for item in value:
            coerced, problem = _coerce(item, args[0])
            if problem:
                return None, f"expected a list of {args[0].__name__} ({problem} for item {_show(item)})"
            out.append(coerced)
        return out, None
    if tp is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS, None
        return None, "expected true or false"
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", "")), None
            except ValueError:
                pass
        return None, "expected an integer"
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # also YAML's '3e-4', which YAML 1.1 reads as a string
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        if number is None or not math.isfinite(number):
            return None, "expected a finite number"
        return number, None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value), None
        return None, "expected a string"
    raise TypeError(f"config schema uses an unsupported type {tp!r}")  # a bug in the schema, not input


def _describe(tp: Any) -> str:
    """How a type reads in an error message: int -> 'an integer', Literal['auto'] -> "'auto'"."""
    if get_origin(tp) is Literal:
        return " or ".join(repr(c) for c in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {get_args(tp)[0].__name__}"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}[tp]


def _show(value: Any) -> str:
    return f"{str(value)!r}" if isinstance(value, _RawOverride) else f"{value!r} ({type(value).__name__})"


def _unknown_key_message(key: str, dotted: str, siblings: list[str]) -> str:
    everywhere = [k for k, _, _ in iter_keys()]
    # The exact name in another section first ('train.lr' -> 'optim.lr'): a fuzzy sibling match
    # ('train.warmup_steps' -> 'train.max_steps') would send the user to a different setting.
    homes = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
    if not homes:
        parent = dotted[: -len(key)]
        homes = [parent + c for c in difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)]
    if not homes:
        homes = difflib.get_close_matches(dotted, everywhere, n=1, cutoff=0.75)
    if homes:
        return f"unknown key {dotted!r} (did you mean {' or '.join(repr(h) for h in homes)}?)"
    return f"unknown key {dotted!r}; allowed here: {', '.join(siblings)}"


def iter_keys(cls: type = JobConfig, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Every leaf key as (dotted name, default, help), in schema order."""
    hints = get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", getattr(instance, f.name), f.metadata.get("help", "")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_derived_defaults(cfg: JobConfig) -> None:
    """Defaults that depend on other keys; the resolved config shows the values they took."""
    if cfg.model.preset is None and cfg.model.path is None:
        cfg.model.preset = "tiny-llama"
    cfg.optim.warmup_steps = cfg.optim.warmup_for(cfg.train.max_steps)


def _environment_problems(cfg: JobConfig) -> list[str]:
    """Checks against the world: names that must exist and files that must be there."""
    from tiertune.launch.datasets import BUILTIN_DATASETS, BUILTIN_PREFIX
    from tiertune.launch.presets import PRESETS, model_dir

    problems = []
    if cfg.model.preset is not None and cfg.model.preset not in PRESETS:
        close = difflib.get_close_matches(cfg.model.preset, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            f"model.preset: {cfg.model.preset!r} is not a preset; {hint}choose one of: {', '.join(PRESETS)}"
        )
    try:
        directory = model_dir(cfg.model.path)
    except ModelError as e:
        problems.append(str(e))
        directory = None
    if directory is not None:
        if not directory.is_dir():
            problems.append(
                f"model.path: {cfg.model.path!r} is not a directory; point it at a "
                "HuggingFace model directory (with config.json)"
            )
        elif not (directory / "config.json").is_file():
            problems.append(
                f"model.path: {cfg.model.path!r} has no config.json; is it a HuggingFace model directory?"
            )
    positions = _model_positions(cfg)
    if positions is not None and cfg.data.seq_len > positions:
        problems.append(
            f"data.seq_len: {cfg.data.seq_len} is longer than the model's {positions} positions; "
            f"lower it to at most {positions}"
        )
    if cfg.data.path.startswith(BUILTIN_PREFIX):
        name = cfg.data.path[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            problems.append(
                f"data.path: {cfg.data.path!r} is not a built-in dataset; choose one of: "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
            )
    elif cfg.data.path and Path(cfg.data.path).is_dir():
        problems.append(f"data.path: {cfg.data.path!r} is a directory; point it at a .jsonl or .txt file")
    elif not Path(cfg.data.path).is_file():
        problems.append(
            f"data.path: {cfg.data.path!r} does not exist (relative paths are taken from "
            "the current directory)"
        )
    return problems


def _model_positions(cfg: JobConfig) -> int | None:
    """The longest sequence the model's position embeddings cover, read without building the model."""
    from tiertune.launch.presets import PRESETS, model_dir

    if cfg.model.preset in PRESETS:
        hf = PRESETS[cfg.model.preset].config
    elif cfg.model.path is not None:
        try:
            hf = json.loads((model_dir(cfg.model.path) / "config.json").read_text())
        except (OSError, ValueError, ModelError):
            return None  # reported by the model.path check, or by loading
    else:
        return None
    return hf.get("max_position_embeddings") or hf.get("n_positions")


def config_to_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
