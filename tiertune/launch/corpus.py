"""Reading training examples from JSONL and plain-text files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tiertune.errors import DataError

_MAX_REPORTED = 5


@dataclass(frozen=True)
class Example:
    """One training example. With a prompt, the loss is on the completion only. With a label, it is a
    classification example: ``completion`` is the text to classify."""

    completion: str
    prompt: str | None = None
    label: str | None = None


def read_examples(path: str | Path, fmt: str = "auto") -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {str(path)!r} does not exist; set data.path to a .jsonl or .txt file")
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"dataset {str(path)!r} is not UTF-8 text (byte {e.start}); convert it first"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read dataset {str(path)!r}: {e.strerror}") from None
    examples = _parse_jsonl(text, path) if fmt == "jsonl" else _parse_text(text)
    if not examples:
        raise DataError(f"dataset {str(path)!r} has no usable examples")
    return examples


def _parse_jsonl(text: str, path: Path) -> list[Example]:
    examples, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {lineno}: not valid JSON ({e.msg})")
            continue
        example, problem = _row_to_example(row)
        problem = problem or _lone_surrogate(example)
        if problem:
            problems.append(f"line {lineno}: {problem}")
        else:
            examples.append(example)
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
        raise DataError(
            f"{len(problems)} bad row(s) in {str(path)!r}; each row must be a JSON object with "
            "a string 'text' (and a 'label' to classify it by), or string 'prompt' and 'completion':\n  "
            + "\n  ".join(problems[:_MAX_REPORTED])
            + more
        )
    return examples


def _row_to_example(row: object) -> tuple[Example | None, str | None]:
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None, "'prompt' and 'completion' must both be strings"
        if not completion:
            return None, "'completion' is empty: there is nothing to learn from this row"
        return Example(prompt=prompt, completion=completion), None
    label = row.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        return None, f"'label' must be a string or an integer, got {_shown(label)}"
    if isinstance(row.get("text"), str) and row["text"]:
        return Example(completion=row["text"], label=None if label is None else str(label)), None
    if "text" in row:
        return None, f"'text' must be a non-empty string, got {_shown(row['text'])}"
    return None, f"no 'text' or 'prompt'/'completion' (keys: {', '.join(map(str, row)) or 'none'})"


def _shown(value: object, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lone_surrogate(example: Example) -> str | None:
    """JSON can escape half of a UTF-16 surrogate pair alone ("\\ud800"): no character, and no tokenizer
    takes it."""
    for value in (example.prompt, example.completion, example.label):
        try:
            (value or "").encode("utf-8")
        except UnicodeEncodeError as e:
            return (
                f"{value[e.start]!r} (character {e.start} of a string) is half of a UTF-16 surrogate pair, "
                "not a character; write the whole pair, or the character itself"
            )
    return None


def _parse_text(text: str) -> list[Example]:
    """Plain text: one example per paragraph (blank-line separated), or per line if there is one paragraph."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(paragraphs) == 1:
        paragraphs = [line.strip() for line in paragraphs[0].splitlines() if line.strip()]
    return [Example(completion=p) for p in paragraphs]
