"""The docs/lora.md memory table: one training step of the public shapes, full SFT vs LoRA vs QLoRA.

Estimates from `unmask.train.memory` (the formula `unmask train --dry-run` prints, checked
against measured CPU steps in tests/test_memory.py) for a GPU run: bfloat16 autocast, AdamW,
batch 1, sequence 2048 (LLaDA2: block diffusion, [noisy | clean] = 4096 positions), LoRA rank 16
on the default targets, QLoRA with the base's linear layers in int8 (--lora-quantize int8), with
and without activation checkpointing.

Usage: python scripts/memory_table.py [--seq-len 2048] [--batch-size 1] [--rank 16]
"""

from __future__ import annotations

import argparse

from unmask.models import PRESETS
from unmask.train.memory import StepShape, estimate_step_memory
from unmask.train.trainer import LLADA2_BLOCK_LENGTH

NAMES = {"llada-8b": "LLaDA-8B", "llada-moe-7b-a1b": "LLaDA-MoE-7B-A1B", "llada2-mini": "LLaDA2.0-mini"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    print("| model | method | act. ckpt | weights | gradients | optimizer | activations | peak |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for preset, name in NAMES.items():
        cfg = PRESETS[preset]
        block = LLADA2_BLOCK_LENGTH if cfg.layout == "llada2_moe" else None
        for method in ("full", "lora", "qlora"):
            for ckpt in (False, True):
                m = estimate_step_memory(cfg, StepShape(args.batch_size, args.seq_len, method, args.rank,
                                                        activation_checkpointing=ckpt, bf16=True,
                                                        block_length=block))
                cells = [f"{v / 2**30:.2f}" for v in (m.weights, m.gradients, m.optimizer, m.activations, m.peak)]
                print(f"| {name} | {method} | {'on' if ckpt else 'off'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
