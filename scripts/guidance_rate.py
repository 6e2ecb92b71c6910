"""Rojas et al.'s normalisation ('norm') under threshold decoding, where guidance sets the unmasking rate.

The know_arc questions of the bundled model's suite (held-out people and phrasings), asked as
"Question: ...\\nAnswer:" and decoded with a confidence threshold (16 tokens, one block). An answer
is right when the completion's first word is the gold value. For each threshold and guidance
weight, each form's accuracy (exact McNemar against w = 0 at that threshold, same questions) and
its forward passes per generated token: plain guidance sharpens the confidences and so commits
more positions per step; 'norm' keeps the unguided model's decisions of when a position unmasks.

Usage: python scripts/guidance_rate.py [--items 312] [--thresholds 0.9 0.7] [--scales 1 2]
                                       [--forms constant norm linear linear,norm] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import unmask
from unmask.bench import answer_matches
from unmask.eval import get_task
from unmask.eval.runner import mcnemar_p
from unmask.eval.tasks import find_data_file, read_rows
from unmask.sampling import SamplerOptions
from unmask.sampling.text import complete_ids


def questions(n: int) -> list[tuple[str, str]]:
    rows = read_rows(find_data_file(get_task("know_arc"), None))[:n]
    return [(f"Question: {row['question']}\nAnswer:", row["meta"]["answer"]) for _, row in rows]


def run(model, tokenizer, items, options: SamplerOptions, batch_size: int) -> tuple[list[float], float]:
    """(per-item correctness, forward passes per generated token of a row)."""
    outcomes, passes, batches = [], 0, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts, n = complete_ids(model, tokenizer, [tokenizer(q)["input_ids"] for q, _ in chunk], **options.kwargs())
        outcomes += [float(answer_matches(t, a)) for t, (_, a) in zip(texts, chunk)]
        passes, batches = passes + n, batches + 1
    return outcomes, passes / (batches * options.gen_length)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=312)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--forms", nargs="+", default=["constant", "norm", "linear", "linear,norm"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    model, tokenizer = unmask.load(None)
    items = questions(args.items)
    lines = [f"bundled model, know_arc, first {len(items)} items, 16 tokens in one block, threshold decoding",
             "", "| threshold | form | w | accuracy | Δ vs w=0 (McNemar p) | passes/token |", "|---|---|---|---|---|---|"]
    for tau in args.thresholds:
        base_opts = SamplerOptions(steps=16, gen_length=16, block_length=16, threshold=tau).check()
        base, base_ppt = run(model, tokenizer, items, base_opts, args.batch_size)
        lines.append(f"| {tau:g} | – | 0 | {100 * statistics.mean(base):.1f} | – | {base_ppt:.3f} |")
        for w in args.scales:
            for form in args.forms:
                opts = SamplerOptions(steps=16, gen_length=16, block_length=16, threshold=tau, cfg_scale=w,
                                      guidance=form).check()
                acc, ppt = run(model, tokenizer, items, opts, args.batch_size)
                delta = 100 * (statistics.mean(acc) - statistics.mean(base))
                lines.append(f"| {tau:g} | {form} | {w:g} | {100 * statistics.mean(acc):.1f} | "
                             f"{delta:+.1f} (p={mcnemar_p(base, acc):.2g}) | {ppt:.3f} |")
            print("\n".join(lines), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
