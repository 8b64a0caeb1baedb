"""What tiertune's loop costs over a bare PyTorch loop, measured side by side in one process.

    bash scripts/venv-run python benchmarks/loop_overhead.py [--steps 40] [--repeats 3]

Both sides train the same seeded tiny-llama on the same rows with fused AdamW; the bare loop has no
metrics, progress, schedule or clipping. The runs alternate (bare, tiertune, bare, ...) so machine
noise hits both, and the ratio of median step times is printed. Checkpoints and eval are off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import TIMED_JOB  # benchmarks/, the script's own directory

from tiertune.config import load_config
from tiertune.launch.data import BatchStream, build_splits
from tiertune.launch.loop import run
from tiertune.launch.models import build_model, load_tokenizer
from tiertune.launch.progress import quiet_libraries


def bare_step_times(cfg, steps: int) -> list[float]:
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model)
    model = build_model(cfg.model, seed=cfg.train.seed)
    stream = BatchStream(build_splits(cfg.data, tok, cfg.train.seed).train, cfg.train.micro_batch_size, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = stream.next_batch()
        logits = model(input_ids=b["input_ids"]).logits
        F.cross_entropy(
            logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100
        ).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times


def tiertune_step_times(steps: int, out: Path) -> list[float]:
    run(load_config(None, [*TIMED_JOB, f"train.max_steps={steps}", f"output_dir={out}"]))
    return [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    cfg = load_config(None, [*TIMED_JOB, f"train.max_steps={args.steps}"])
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            bare += bare_step_times(cfg, args.steps)[3:]  # the first steps warm up allocators and caches
            ours += tiertune_step_times(args.steps, Path(tmp) / f"r{r}")[3:]
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"tiny-llama, {cfg.train.micro_batch_size}x{cfg.data.seq_len} tokens/step, {torch.get_num_threads()} threads, "
        f"{args.repeats}x{args.steps} steps each"
    )
    print(f"  bare PyTorch loop   median step {b * 1e3:7.1f} ms")
    print(f"  tiertune loop       median step {o * 1e3:7.1f} ms")
    print(f"  ratio tiertune/bare {o / b:.3f}")


if __name__ == "__main__":
    main()
