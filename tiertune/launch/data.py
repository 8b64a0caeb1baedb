"""Tokenize, split, pack and serve batches in a deterministic, resumable order.

Layout of a packed sequence: examples are laid end to end as ``<bos> prompt completion <eos>`` and cut
into rows of ``seq_len`` tokens. ``labels`` equal ``input_ids`` where the loss applies and -100
elsewhere (prompt tokens, <bos>, the padding of the last row). The model predicts ``labels[:, 1:]``
from ``input_ids[:, :-1]``.

Classification (``model.task=sequence_classification``): each example is one row of ``seq_len`` tokens,
the tokenizer's own special tokens around the text (BERT's [CLS] ... [SEP]), truncated or right-padded,
with an ``attention_mask`` (1 on text tokens) and one class id per row in ``labels``.

Order: the training rows are visited in a fresh permutation each epoch, drawn from ``(seed, epoch)``,
so the whole order is a pure function of the seed and the number of rows consumed. That count is the
data position a checkpoint stores.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.config import DataConfig
from tiertune.errors import DataError
from tiertune.launch.corpus import Example, read_examples
from tiertune.launch.datasets import BUILTIN_DATASETS, BUILTIN_PREFIX
from tiertune.launch.progress import say

IGNORE_INDEX = -100  # the label value cross-entropy skips


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [rows, seq_len] int64
    labels: torch.Tensor  # [rows, seq_len] int64, IGNORE_INDEX where no loss applies; [rows]: class ids
    attention_mask: torch.Tensor | None = None  # [rows, seq_len] int64 (classification rows: 1 on text)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """These rows as a model batch."""
        batch = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
        if self.attention_mask is not None:
            batch["attention_mask"] = self.attention_mask[index]
        return batch


def count_targets(labels: torch.Tensor) -> int:
    """What carries loss: tokens of [rows, seq_len] LM labels (the model predicts labels[:, 1:]), or the
    rows of [rows] class labels."""
    if labels.ndim == 1:
        return int((labels != IGNORE_INDEX).sum())
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class Splits:
    train: PackedRows
    eval: PackedRows
    eval_examples: list[Example]  # the held-out examples, for answer checks

    def fingerprint(self) -> str:
        """sha256 of every packed token and label: a resumed job must see exactly the same rows."""
        digest = hashlib.sha256()
        tensors = [self.train.input_ids, self.train.labels, self.eval.input_ids, self.eval.labels]
        tensors += [t for t in (self.train.attention_mask, self.eval.attention_mask) if t is not None]
        for t in tensors:
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


def dataset_labels(examples: list[Example]) -> list[str]:
    """The distinct labels of a classification dataset, sorted (as numbers when they all are)."""
    labels = {e.label for e in examples if e.label is not None}
    if not labels:
        raise DataError(
            "no row carries a 'label': sequence classification needs rows with a 'text' and a 'label'"
        )
    if len(labels) == 1:
        raise DataError(f"every row has the label {labels.pop()!r}: a classifier needs two or more classes")
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def encode_classification(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int, labels: list[str]
) -> PackedRows:
    """One row per example: its text with the tokenizer's special tokens, cut or right-padded to
    ``seq_len``, its attention mask, and its class id in ``labels``."""
    ids = {name: i for i, name in enumerate(labels)}
    unknown = sorted({e.label for e in examples if e.label not in ids}, key=str)
    if unknown:
        raise DataError(
            f"rows labelled {unknown[:5]} are not among model.labels {labels}: label every row with one "
            "of them, or leave model.labels empty to take the dataset's"
        )
    texts = [e.completion for e in examples]
    if not texts:
        empty = torch.empty(0, seq_len, dtype=torch.long)
        return PackedRows(empty, torch.empty(0, dtype=torch.long), empty.clone())
    long = sum(len(t) > seq_len for t in tokenizer(texts)["input_ids"])
    if long:
        say(f"{long} of {len(texts)} texts are longer than data.seq_len={seq_len} tokens and are cut")
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    return PackedRows(
        enc["input_ids"].long(),
        torch.tensor([ids[e.label] for e in examples], dtype=torch.long),
        enc["attention_mask"].long(),
    )


def build_splits(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, labels: list[str] | None = None
) -> Splits:
    """The train and eval rows: packed LM rows, or with ``labels`` (the class names) classification rows."""
    examples = load_examples(cfg)
    if not labels and any(e.label is not None for e in examples):
        raise DataError(
            f"the rows of {cfg.path!r} carry a 'label': to train a classifier on them set "
            "model.task=sequence_classification"
        )
    if labels and any(e.label is None for e in examples):
        n = sum(e.label is None for e in examples)
        raise DataError(f"{n} row(s) of {cfg.path!r} have no 'label': a classifier needs every row labelled")
    train_ex, eval_ex = split_examples(examples, cfg.eval_fraction, seed)
    if labels:
        return Splits(
            encode_classification(train_ex, tokenizer, cfg.seq_len, labels),
            encode_classification(eval_ex, tokenizer, cfg.seq_len, labels),
            eval_ex,
        )
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
        return self.rows.select(self.next_indices())


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int) -> list[dict[str, torch.Tensor]]:
    """The eval split in order, ``max_batches`` at most (0: all)."""
    out = []
    for start in range(0, len(rows), batch_size):
        if max_batches and len(out) == max_batches:
            break
        out.append(rows.select(slice(start, start + batch_size)))
    return out
