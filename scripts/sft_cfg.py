"""The seed's second claim, measured: after SFT, unsupervised CFG vs standard CFG vs no guidance.

Three arms on the same items, the same SFT data, steps and seed:
  (a) unsupervised  the model fine-tuned WITHOUT condition dropout, guided at w (the
                    unconditional branch: the context replaced by mask tokens, never trained for)
  (b) standard      the model fine-tuned WITH condition dropout (`--cond-drop`: a dropped row's
                    whole prompt is replaced by mask tokens, so that canvas is trained), guided at w
                    with the same canvas: for an MDM the "null condition" is the masked prompt
  (c) none          model (a) at w = 0
Each arm is scored by `unmask eval`'s own functions (score_item, item_metrics: chain-rule
likelihood on the bundled know_* suite); the table gives each arm's accuracy and the paired
difference of every two arms on the same items with its exact McNemar p-value (mcnemar_p).

Usage:
  python scripts/sft_cfg.py --unsupervised RUN_A --standard RUN_B [--scales 0.5 1] [--limit N]
                            [--out docs/results/sft_cfg.md]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import unmask
from unmask.eval import DEFAULT_TASKS, EvalConfig, get_task, load_items
from unmask.eval.runner import item_metrics, mcnemar_p, score_item
from unmask.likelihood import Column


def per_item(model, tokenizer, task, items, scales: list[float], config: EvalConfig) -> dict[float, list[float]]:
    """scale -> the primary metric (0/1) of every item."""
    columns = [Column(w) for w in scales]
    scores = [score_item(model, tokenizer, task, item, i, columns, config) for i, item in enumerate(items)]
    return {w: [item_metrics(task, items[sc.index], sc, s)[task.primary] for sc in scores]
            for s, w in enumerate(scales)}


def row(name: str, base: list[float], other: list[float]) -> str:
    diffs = [b - a for a, b in zip(base, other)]
    return f"{name}: {100 * statistics.mean(diffs):+.2f} (p={mcnemar_p(base, other):.2g})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unsupervised", required=True, help="run or checkpoint dir: SFT without condition dropout")
    p.add_argument("--standard", required=True, help="run or checkpoint dir: SFT with condition dropout")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = EvalConfig(mode="chain", progress=False)
    scales = [0.0] + args.scales
    model_a, tok = unmask.load(args.unsupervised)
    model_b, _ = unmask.load(args.standard)
    lines = ["| task | n | w | (c) none | (a) unsupervised | (b) standard | (a) − (c) | (b) − (c) | (a) − (b) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in args.tasks.split(","):
        task = get_task(name)
        items = load_items(task, None, args.limit)
        a = per_item(model_a, tok, task, items, scales, config)
        b = per_item(model_b, tok, task, items, scales, config)
        none = a[0.0]
        for w in args.scales:
            acc = [f"{100 * statistics.mean(v):.2f}" for v in (none, a[w], b[w])]
            lines.append(f"| {name} {task.primary} | {len(items)} | {w:g} | " + " | ".join(acc) + " | "
                         + " | ".join(row(n, x, y).split(": ")[1] for n, x, y in
                                      (("a-c", none, a[w]), ("b-c", none, b[w]), ("a-b", b[w], a[w]))) + " |")
        lines.append(f"| {name} {task.primary} | {len(items)} | 0 (b's own) | | | "
                     f"{100 * statistics.mean(b[0.0]):.2f} | | {row('b0-c', none, b[0.0]).split(': ')[1]} | |")
        print("\n".join(lines[-len(args.scales) - 1:]), flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
