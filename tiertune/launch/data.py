"""Tokenize, split, pack and serve batches in a deterministic, resumable order.

Layout of a packed sequence: examples are laid end to end as ``<bos> prompt completion <eos>`` and cut
into rows of ``seq_len`` tokens. ``labels`` equal ``input_ids`` where the loss applies and -100
elsewhere (prompt tokens, <bos>, the padding of the last row). The model predicts ``labels[:, 1:]``
from ``input_ids[:, :-1]``.

Order: the training rows are visited in a fresh permutation each epoch, drawn from ``(seed, epoch)``,
so the whole order is a pure function of the seed and the number of rows consumed. That count is the
data position a checkpoint stores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import DataConfig
from tiertune.errors import DataError
from tiertune.launch.corpus import Example, read_examples
from tiertune.launch.datasets import BUILTIN_DATASETS, BUILTIN_PREFIX

IGNORE_INDEX = -100  # the label value cross-entropy skips


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [rows, seq_len] int64
    labels: torch.Tensor  # [rows, seq_len] int64, IGNORE_INDEX where no loss applies

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a [rows, seq_len] label tensor (the model predicts labels[:, 1:])."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class Splits:
    train: PackedRows
    eval: PackedRows
    eval_examples: list[Example]  # the held-out examples, for answer checks

    def fingerprint(self) -> str:
        """sha256 of every packed token and label: a resumed job must see exactly the same rows."""
        digest = hashlib.sha256()
        for t in (self.train.input_ids, self.train.labels, self.eval.input_ids, self.eval.labels):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()


def load_examples(cfg: DataConfig) -> list[Example]:
    if cfg.path.startswith(BUILTIN_PREFIX):
        name = cfg.path[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            raise DataError(
                f"unknown built-in dataset {cfg.path!r}; choose one of: "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
            )
        return BUILTIN_DATASETS[name]()
    return read_examples(cfg.path, cfg.format)


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``eval_fraction`` of the examples, chosen by the seed (before packing, so no leaks)."""
    n_eval = round(len(examples) * eval_fraction)
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), len(examples) - 1)
    if len(examples) - n_eval < 1:
        raise DataError(f"the dataset has {len(examples)} example(s): too few to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def tokenize(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int]]]:
    """Each example -> (ids, labels) with <bos>/<eos> where the tokenizer has them."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = [e.prompt or "" for e in examples]
    completions = [e.completion for e in examples]
    prompt_ids = (
        tokenizer(prompts, add_special_tokens=False)["input_ids"] if any(prompts) else [[]] * len(examples)
    )
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(prompt_ids, completion_ids):
        ids = bos + p + c + eos
        labels = [IGNORE_INDEX] * (len(bos) + len(p)) + c + eos
        out.append((ids, labels))
    return out


def pack(sequences: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> PackedRows:
    """Lay the examples end to end and cut rows of ``seq_len``; the last row is padded (loss masked)."""
    ids = [t for s, _ in sequences for t in s]
    labels = [t for _, lab in sequences for t in lab]
    pad = -len(ids) % seq_len
    ids += [pad_id] * pad
    labels += [IGNORE_INDEX] * pad
    return PackedRows(
        torch.tensor(ids, dtype=torch.long).view(-1, seq_len),
        torch.tensor(labels, dtype=torch.long).view(-1, seq_len),
    )


def build_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> Splits:
    examples = load_examples(cfg)
    train_ex, eval_ex = split_examples(examples, cfg.eval_fraction, seed)
    train = pack(tokenize(train_ex, tokenizer), cfg.seq_len, tokenizer.pad_token_id)
    if count_targets(train.labels) == 0:
        raise DataError(f"no training tokens carry loss in {cfg.path!r}: are all completions empty?")
    evaluation = (
        pack(tokenize(eval_ex, tokenizer), cfg.seq_len, tokenizer.pad_token_id)
        if eval_ex
        else PackedRows(
            torch.empty(0, cfg.seq_len, dtype=torch.long), torch.empty(0, cfg.seq_len, dtype=torch.long)
        )
    )
    return Splits(train, evaluation, eval_ex)


class BatchStream:
    """Training batches in a seeded order that can be resumed from a row count."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int, position: int = 0) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.position = position  # training rows consumed since the start of the run
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.rows), generator=gen)
        return self._perm

    def next_indices(self) -> torch.Tensor:
        n = len(self.rows)
        picks = []
        for k in range(self.position, self.position + self.batch_size):
            picks.append(self._order(k // n)[k % n])
        self.position += self.batch_size
        return torch.stack(picks)

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = self.next_indices()
        return {"input_ids": self.rows.input_ids[idx], "labels": self.rows.labels[idx]}


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int) -> list[dict[str, torch.Tensor]]:
    """The eval split in order, ``max_batches`` at most (0: all)."""
    out = []
    for start in range(0, len(rows), batch_size):
        if max_batches and len(out) == max_batches:
            break
        sl = slice(start, start + batch_size)
        out.append({"input_ids": rows.input_ids[sl], "labels": rows.labels[sl]})
    return out
