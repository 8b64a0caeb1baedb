"""Progress for people: a bar on a terminal, a line every few steps in logs, and a loss-curve SVG."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tiertune.memory import format_bytes


def quiet_libraries() -> None:
    """Keep the terminal for tiertune's own progress: no library warnings or bars for routine work."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"transformers\."
    )  # deprecations in its own calls
    if not torch.cuda.is_available():
        # transformers imports DeepSpeed (when installed) while saving; told the accelerator, DeepSpeed
        # does not warn that it found none.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# Set while the job runs on several ranks: rank 0 speaks for the job, the others keep quiet.
_rank: int | None = None


def set_rank(rank: int | None) -> None:
    global _rank
    _rank = rank


def say(message: str) -> None:
    if _rank:
        return
    print(f"tiertune: {message}", file=sys.stderr, flush=True)


class Progress:
    def __init__(self, mode: str, total: int, start: int, log_every: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.log_every, self.total = mode, log_every, total
        self._bar = (
            tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
            if mode == "bar"
            else None
        )

    def update(self, row: dict[str, Any]) -> None:
        fields = {
            "loss": "n/a" if row["loss"] is None else f"{row['loss']:.4f}",
            "lr": f"{row['lr']:.2e}",
            "tok/s": f"{row['tokens_per_s']:.0f}",
            "rss": format_bytes(row["rss_bytes"]),
        }
        if "eval_loss" in row:
            fields["eval"] = f"{row['eval_loss']:.4f}"
            if row.get("eval_accuracy") is not None:
                fields["acc"] = f"{row['eval_accuracy']:.1%}"
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(1)
        elif self.mode == "lines" and (
            row["step"] % self.log_every == 0 or row["step"] == self.total or "eval_loss" in row
        ):
            say(f"step {row['step']}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def write_loss_svg(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss (and eval loss where measured) against the step, as a dependency-free SVG."""
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train:
        return
    w, h, pad = 640, 360, 48
    xs = [s for s, _ in train + evals]
    ys = [v for _, v in train + evals]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-6)

    def pt(step: float, value: float) -> str:
        x = pad + (step - x0) / (x1 - x0) * (w - 2 * pad)
        y = h - pad - (value - y0) / (y1 - y0) * (h - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{pad}" y="{h - pad + 16}" text-anchor="middle">{x0}</text>',
        f'<text x="{w - pad}" y="{h - pad + 16}" text-anchor="middle">{x1}</text>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">step</text>',
        f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end">{y0:.2f}</text>',
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.2f}</text>',
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{" ".join(pt(s, v) for s, v in train)}"/>',
        f'<text x="{w - pad}" y="{pad - 8}" text-anchor="end" fill="#1f77b4">train loss</text>',
    ]
    if evals:
        parts.append(
            f'<polyline fill="none" stroke="#d62728" stroke-width="2" '
            f'points="{" ".join(pt(s, v) for s, v in evals)}"/>'
        )
        parts += [
            f'<circle cx="{pt(s, v).split(",")[0]}" cy="{pt(s, v).split(",")[1]}" r="3" fill="#d62728"/>'
            for s, v in evals
        ]
        parts.append(
            f'<text x="{w - pad - 80}" y="{pad - 8}" text-anchor="end" fill="#d62728">eval loss</text>'
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
