"""An unmodified HuggingFace Trainer with tiertune's offload engine and optimizer: weights and optimizer
state on an NVMe store, streamed block by block, AdamW block by block where the state lives.

    bash scripts/venv-run python examples/hf_trainer.py             # tiny-llama, 40 steps, a few seconds
    bash scripts/venv-run python examples/hf_trainer.py --lora      # the same with peft's LoRA adapters

What tiertune adds to the usual script is the plugin: built from the model and the arguments, it gives
the Trainer its optimizer pair and a callback (see tiertune/launch/hf_plugin.py).
"""

from __future__ import annotations

import argparse
import tempfile

from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from tiertune.config import DataConfig, ModelConfig
from tiertune.launch.data import build_splits
from tiertune.launch.hf_plugin import TiertunePlugin
from tiertune.launch.models import build_model, load_tokenizer
from tiertune.launch.progress import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lora", action="store_true", help="train peft LoRA adapters over the frozen model")
    parser.add_argument(
        "--output-dir", default=None, help="the Trainer's output_dir (default: a temporary one)"
    )
    ns = parser.parse_args()
    quiet_libraries()

    # Any causal LM and dataset of input_ids/labels rows do; here tiertune's tiny-llama and its question/
    # answer rows, so that the script runs anywhere without downloads.
    model_cfg = ModelConfig(preset="tiny-llama")
    model = build_model(model_cfg, seed=0)
    if ns.lora:
        model = get_peft_model(
            model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
    rows = build_splits(DataConfig(seq_len=128), load_tokenizer(model_cfg), seed=0).train
    data = [{"input_ids": rows.input_ids[i], "labels": rows.labels[i]} for i in range(len(rows))]

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=ns.output_dir or scratch,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_steps=ns.steps,
            learning_rate=2e-3,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            max_grad_norm=1.0,
            logging_steps=min(10, ns.steps),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        # tiertune's keys for where the state lives: here everything on the NVMe store (in output_dir)
        with TiertunePlugin(model, args, {"offload.params": "nvme", "offload.optimizer": "nvme"}) as plugin:
            trainer = Trainer(
                model=model, args=args, train_dataset=data, optimizers=plugin.optimizers(), callbacks=[plugin]
            )
            trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.4f} (step {args.logging_steps}) -> {losses[-1]:.4f} (step {ns.steps})")


if __name__ == "__main__":
    main()
