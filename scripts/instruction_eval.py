"""Exact-match accuracy on the knowledge world's instruction prompts (docs/lora.md's worked example).

The prompts are SFT pairs drawn from their own stream (`generate_sft_pairs(n, seed)`; seed 0 is
the stream `python -m unmask.data.knowledge --sft N` writes, so pass another seed for prompts the
run did not train on; they ask about the same qa people, in the training phrasings). Only pairs
whose answer is one word (a value, or yes/no) are scored: the greedy answer's first word, less
trailing punctuation, must equal it. Each
model is scored through the chat template (as SFT trains it) and, for reference, on the plain
prompt, at each cfg scale.

Usage: python scripts/instruction_eval.py [--adapter DIR] [--model DIR] [--n 300] [--seed 1]
       [--cfg-scale 0 1]
"""

from __future__ import annotations

import argparse

import torch

import unmask
from unmask.data.knowledge import generate_sft_pairs
from unmask.sampling.text import generate_text


def word_pairs(n: int, seed: int) -> list[dict]:
    """The first `n` pairs of the stream whose response is a single word."""
    out, drawn = [], 0
    while len(out) < n:
        batch = generate_sft_pairs(drawn + 4 * n, seed)[drawn:]
        drawn += len(batch)
        out += [p for p in batch if len(p["response"].split()) == 1][: n - len(out)]
    return out


def accuracy(model, tokenizer, pairs: list[dict], chat: bool, cfg_scale: float, batch: int = 50) -> float:
    answers = generate_text(model, tokenizer, [p["prompt"] for p in pairs], chat=chat, batch_size=batch, steps=4,
                            gen_length=4, block_length=4, cfg_scale=cfg_scale)
    return sum(first_word(a) == p["response"].strip() for a, p in zip(answers, pairs)) / len(pairs)


def first_word(answer: str) -> str:
    """The answer's first word without the punctuation after it ("soup." and "soup" are both soup)."""
    words = answer.split()
    return words[0].rstrip(".,;:!?") if words else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cfg-scale", type=float, nargs="+", default=[0.0, 1.0])
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = unmask.load(args.model, adapter=args.adapter)
    pairs = word_pairs(args.n, args.seed)
    for chat in (True, False):
        cells = [f"w={w}: {100 * accuracy(model, tokenizer, pairs, chat, w):.1f} %" for w in args.cfg_scale]
        print(f"{'chat template' if chat else 'plain prompt '}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
