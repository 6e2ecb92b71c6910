"""Guidance forms on a multi-token generation task, where schedules and A-CFG can act.

The know_arc questions (held-out people, held-out phrasings) asked in the SFT format through the
chat template, "Answer in a full sentence.": the answer is a sentence, so tokens are committed
before the answer word is, and a schedule's t and A-CFG's re-masking have something to work on.
An answer is right when the gold value appears as a word in the generated text. With --plain, the
pretrained model's own format instead ("Question: ...\nAnswer:", no template, 4 tokens): the answer
is the first generated word (the model goes on with a next question after it). Every (model,
form) cell is paired against the first model at w = 0 on the same questions (exact McNemar); with
--out, FILE.json keeps every cell's per-question outcomes for other pairings.

Usage: python scripts/guidance_generation.py --models RUN_A [RUN_B ...] [--forms constant linear acfg:0.5]
                                             [--scale 1] [--items 312] [--plain] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import unmask
from unmask.bench import answer_matches
from unmask.eval import get_task
from unmask.eval.tasks import find_data_file, read_rows
from unmask.eval.runner import mcnemar_p
from unmask.sampling.text import generate_text

FORMS = ("constant", "linear", "interval:0.5:1", "acfg:0.5", "acfg:0.9", "linear,acfg:0.5")


def questions(n: int) -> list[tuple[str, str]]:
    """(question, gold answer) of the first n know_arc items."""
    rows = read_rows(find_data_file(get_task("know_arc"), None))[:n]
    return [(row["question"], row["meta"]["answer"]) for _, row in rows]


def correct(text: str, answer: str, first_word: bool = False) -> float:
    if first_word:
        return float(answer_matches(text, answer))
    return float(re.search(rf"\b{re.escape(answer.lower())}\b", text.lower()) is not None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--forms", nargs="+", default=list(FORMS))
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--items", type=int, default=312)
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--plain", action="store_true", help="the pretrained model's format: no chat template, "
                   "the answer is the first generated word (use --gen-length 4)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    items = questions(args.items)
    if args.plain:
        prompts = [f"Question: {q}\nAnswer:" for q, _ in items]
    else:
        prompts = [[{"role": "user", "content": f"Answer in a full sentence.\nQuestion: {q}\nAnswer:"}] for q, _ in items]
    kw = dict(steps=args.gen_length, gen_length=args.gen_length, block_length=args.gen_length)
    lines = [f"| model | form | w | accuracy | Δ vs {Path(args.models[0]).name} w=0 |", "|---|---|---|---|---|"]
    base, outcomes = None, {}
    for path in args.models:
        model, tok = unmask.load(path)
        for form, w in [("–", 0.0)] + [(f, args.scale) for f in args.forms]:
            texts = generate_text(model, tok, prompts, chat=not args.plain, batch_size=args.batch, cfg_scale=w,
                                  guidance="constant" if form == "–" else form, **kw)
            right = [correct(t, a, first_word=args.plain) for t, (_, a) in zip(texts, items)]
            base = right if base is None else base
            outcomes[f"{Path(path).name} {form} w={w:g}"] = right
            delta = 100 * statistics.mean(b - a for a, b in zip(base, right))
            lines.append(f"| {Path(path).name} | {form} | {w:g} | {100 * statistics.mean(right):.2f} | "
                         f"{delta:+.2f} (p={mcnemar_p(base, right):.2g}) |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(outcomes))


if __name__ == "__main__":
    main()
