"""Answer checks: greedy completions of held-out prompts, scored by exact match."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tiertune.launch.corpus import Example


@torch.no_grad()
def greedy_complete(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    device: torch.device,
    agree: Callable[[int], int] | None = None,
) -> str:
    """The argmax continuation of ``prompt`` up to <eos> or ``max_new_tokens`` (no KV cache: short answers).
    ``agree`` maps each token chosen to the one every rank of a sharded model decodes (rank 0's), so all
    of them run the same forwards (each gathers every block from all)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=ids).logits[0, -1].argmax())
        if agree is not None:
            next_id = agree(next_id)
        if next_id == tokenizer.eos_token_id:
            break
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return tokenizer.decode(new)


def exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    limit: int,
    device: torch.device,
    agree: Callable[[int], int] | None = None,
) -> dict[str, Any] | None:
    """Share of the first ``limit`` held-out prompt/completion examples answered exactly (whitespace-trimmed)."""
    tasks = [e for e in examples if e.prompt is not None][:limit]
    if not tasks:
        return None
    was_training = model.training
    model.eval()
    samples, correct = [], 0
    for ex in tasks:
        budget = len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + 4
        answer = greedy_complete(model, tokenizer, ex.prompt, budget, device, agree)
        ok = answer.strip() == ex.completion.strip()
        correct += ok
        if len(samples) < 5:
            samples.append({"prompt": ex.prompt, "expected": ex.completion, "answer": answer, "correct": ok})
    model.train(was_training)
    return {"correct": correct, "total": len(tasks), "accuracy": correct / len(tasks), "samples": samples}
