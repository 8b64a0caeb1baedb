"""Datasets tiertune generates itself, so the default job needs no download.

``builtin:arithmetic`` is instruction/answer pairs whose answers can be checked exactly: sums,
differences, word reversal, upper-casing, letter counting and digit sorting. ``builtin:reviews`` is
short reviews labelled positive or negative (rows with a ``label``, for sequence classification). The
content is fixed (each its own generator seed); ``train.seed`` only decides the eval split and the order.
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


_ITEMS = [
    "food",
    "service",
    "room",
    "movie",
    "book",
    "phone",
    "camera",
    "hotel",
    "staff",
    "screen",
    "battery",
    "coffee",
    "concert",
    "game",
    "sofa",
    "laptop",
    "meal",
    "flight",
    "car",
    "album",
    "show",
    "jacket",
]
_GOOD = [
    "great",
    "excellent",
    "wonderful",
    "good",
    "lovely",
    "fantastic",
    "superb",
    "pleasant",
    "amazing",
    "delightful",
    "perfect",
    "brilliant",
    "enjoyable",
    "impressive",
    "reliable",
    "comfortable",
    "friendly",
    "beautiful",
    "charming",
    "solid",
]
_BAD = [
    "terrible",
    "awful",
    "bad",
    "poor",
    "horrible",
    "disappointing",
    "boring",
    "dreadful",
    "broken",
    "unpleasant",
    "mediocre",
    "rude",
    "ugly",
    "noisy",
    "slow",
    "useless",
    "dirty",
    "painful",
    "cheap",
    "annoying",
]
_INTENSITY = ["", "", "really ", "very ", "quite ", "truly ", "rather ", "extremely "]
_OPENERS = ["", "", "Honestly, ", "Overall, ", "To be fair, ", "In short, ", "Well, "]


def _clause(rng: random.Random, positive: bool, item: str) -> str:
    """A clause about ``item`` whose sentiment is ``positive``: plain, or a negated opposite word."""
    if rng.random() < 0.35:  # negation: "not <opposite>" says the same
        word = rng.choice(_BAD if positive else _GOOD)
        neg = rng.choice(["was not", "was never", "wasn't", "was not at all"])
        return f"the {item} {neg} {word}"
    word = rng.choice(_GOOD if positive else _BAD)
    return f"the {item} was {rng.choice(_INTENSITY)}{word}"


def _review(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    item, other = rng.sample(_ITEMS, 2)
    roll = rng.random()
    if roll < 0.2:  # contrast: the clause after "but" decides
        first = _clause(rng, not positive, other)
        text = f"{first}, but {_clause(rng, positive, item)}."
    elif roll < 0.35:  # concession: the main clause decides, before or after "although"
        main, conceded = _clause(rng, positive, item), _clause(rng, not positive, other)
        conj = rng.choice(["although", "even though", "though"])
        text = f"{conj} {conceded}, {main}." if rng.random() < 0.5 else f"{main}, {conj} {conceded}."
    elif roll < 0.55:  # an expectation met ("and it was") or not ("but it was not")
        met = rng.random() < 0.5
        word = rng.choice(_GOOD if positive == met else _BAD)
        outcome = "and it was" if met else rng.choice(["but it was not", "but it wasn't"])
        text = f"I expected the {item} to be {word}, {outcome}."
    else:
        text = _clause(rng, positive, item) + "."
    text = rng.choice(_OPENERS) + text
    text = text[0].upper() + text[1:]
    return Example(completion=text, label="positive" if positive else "negative")


def reviews(n: int = 4000, seed: int = 20261122) -> list[Example]:
    """Short reviews labelled positive or negative, with negations ("was not bad"), contrasts ("..., but
    the service was rude": the last clause decides), concessions (the main clause decides, before or after
    "although") and expectations met or not ("I expected the room to be dirty, but it was not"): a
    classification task for ``model.task=sequence_classification``."""
    rng = random.Random(seed)
    return [_review(rng) for _ in range(n)]


BUILTIN_DATASETS: dict[str, Callable[[], list[Example]]] = {"arithmetic": arithmetic, "reviews": reviews}
