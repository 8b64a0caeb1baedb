"""Datasets tiertune generates itself, so the default job needs no download.

``builtin:arithmetic`` is instruction/answer pairs whose answers can be checked exactly: sums,
differences, word reversal, upper-casing, letter counting and digit sorting. The content is fixed
(its own generator seed); ``train.seed`` only decides the eval split and the order.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tiertune.launch.corpus import Example

BUILTIN_PREFIX = "builtin:"

_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "planet",
    "silver",
    "window",
    "yellow",
    "orange",
    "forest",
    "candle",
    "market",
    "rocket",
    "winter",
    "summer",
    "bridge",
    "castle",
    "dragon",
    "pencil",
    "spider",
    "tomato",
    "violin",
    "wizard",
    "anchor",
    "basket",
    "button",
    "carpet",
    "dinner",
    "engine",
    "feather",
    "guitar",
    "hammer",
    "island",
    "jacket",
    "kitten",
    "ladder",
    "magnet",
    "needle",
    "pepper",
    "rabbit",
    "saddle",
    "ticket",
    "umbrella",
    "valley",
    "walnut",
    "zipper",
    "copper",
    "meadow",
    "harbor",
    "lantern",
]


def _sum(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Example(prompt=f"Q: What is {a} + {b}?\nA:", completion=f" {a + b}")


def _difference(rng: random.Random) -> Example:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return Example(prompt=f"Q: What is {a} - {b}?\nA:", completion=f" {a - b}")


def _reverse(rng: random.Random) -> Example:
    word = rng.choice(_WORDS)
    return Example(prompt=f"Q: Reverse the word '{word}'.\nA:", completion=f" {word[::-1]}")


def _upper(rng: random.Random) -> Example:
    words = " ".join(rng.sample(_WORDS, 2))
    return Example(prompt=f"Q: Write '{words}' in capitals.\nA:", completion=f" {words.upper()}")


def _count(rng: random.Random) -> Example:
    word = rng.choice(_WORDS)
    return Example(prompt=f"Q: How many letters are in '{word}'?\nA:", completion=f" {len(word)}")


def _sort_digits(rng: random.Random) -> Example:
    digits = [rng.randint(0, 9) for _ in range(4)]
    shown = " ".join(map(str, digits))
    return Example(
        prompt=f"Q: Sort the digits {shown}.\nA:", completion=" " + " ".join(map(str, sorted(digits)))
    )


_TASKS = (_sum, _difference, _reverse, _upper, _count, _sort_digits)


def arithmetic(n: int = 6000, seed: int = 20261121) -> list[Example]:
    rng = random.Random(seed)
    return [rng.choice(_TASKS)(rng) for _ in range(n)]


BUILTIN_DATASETS: dict[str, Callable[[], list[Example]]] = {"arithmetic": arithmetic}
