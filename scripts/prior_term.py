"""Where unsupervised CFG can change an answer: the prior term of each choice, per task.

For a choice a, guidance scores (1 + w)·log p(a | prompt) − w·log p(a | prompt masked) (for a
one-token answer exactly; token by token for longer ones). The second term is the choice's prior
under the model. CFG can only change which choice wins when that prior differs between choices,
and it helps when the prior favours wrong choices on the items the model is unsure of.

Per task this prints, from the same chain-rule scores `unmask eval` uses (w = 0):
  acc w=0     argmax of log p(a | prompt)
  acc prior   argmax of log p(a | prompt masked): the prior alone
  acc PMI     argmax of log p(a | prompt) − log p(a | prompt masked): the limit w → ∞
  anti-prior  argmin of log p(a | prompt masked): a rule that knows nothing and picks the least
              common choice (how much a suite's answer distribution alone gives away)
  prior gap   mean over items of prior(gold) − max prior(others), nats: < 0 when the prior leans
              towards the distractors
  errors      the items wrong at w = 0, and the share of them whose chosen answer has a higher
              prior than the gold (the errors CFG can fix)
  AUC         two-choice tasks (yes/no): how well the score difference log p(b | prompt) −
              log p(a | prompt) separates the items whose answer is b from those whose answer is
              a (0.5: not at all). Where the prior is one number for every item (the yes/no
              prior with the prompt masked), guidance only shifts the threshold on that
              difference, which can gain only if the difference separates the items.
Cloze tasks (one request per item) are skipped: there is no choice for the prior to tilt.

Usage: python scripts/prior_term.py [--model DIR] [--tasks know_arc,...] [--out docs/results/prior_term.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import unmask
from unmask.eval import DEFAULT_TASKS, get_task, load_items
from unmask.eval.encoding import encode_pair
from unmask.likelihood import Request, score_requests
from unmask.sampling.options import context_length


def choice_scores(model, tokenizer, items) -> tuple[list[list[float]], list[list[float]]]:
    """(conditional, prior) chain-rule log-likelihoods, [item][choice]; the prior masks every
    context token, which is exactly the unconditional canvas guidance uses."""
    mask_id = model.config.mask_token_id
    limit = context_length(model)
    cond_requests, prior_requests, sizes = [], [], []
    for item in items:
        for context, continuation in item.requests:
            ctx, cont = encode_pair(tokenizer, context, continuation, limit)
            cond_requests.append(Request(ctx, cont))
            prior_requests.append(Request([mask_id] * len(ctx), cont))
        sizes.append(len(item.requests))
    cond = [e[0].value for e in score_requests(model, cond_requests, mode="chain")]
    prior = [e[0].value for e in score_requests(model, prior_requests, mode="chain")]
    out_cond, out_prior, start = [], [], 0
    for n in sizes:
        out_cond.append(cond[start:start + n])
        out_prior.append(prior[start:start + n])
        start += n
    return out_cond, out_prior


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def separation(cond: list[list[float]], gold: list[int]) -> float | None:
    """AUC of the score difference cond[1] − cond[0] for telling gold 1 from gold 0 (ties count
    half); None unless every item has two choices and both answers occur."""
    if any(len(c) != 2 for c in cond):
        return None
    diff = [c[1] - c[0] for c in cond]
    ones = [d for d, g in zip(diff, gold) if g == 1]
    zeros = [d for d, g in zip(diff, gold) if g == 0]
    if not ones or not zeros:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in ones for b in zeros) / (len(ones) * len(zeros))


def prior_row(items, cond, prior) -> dict:
    n = len(items)
    gold = [it.gold for it in items]
    pick = [argmax(c) for c in cond]
    errors = [i for i in range(n) if pick[i] != gold[i]]
    tilted = [i for i in errors if prior[i][pick[i]] > prior[i][gold[i]]]
    gaps = [prior[i][gold[i]] - max(p for j, p in enumerate(prior[i]) if j != gold[i]) for i in range(n)]
    pmi = [argmax([c - p for c, p in zip(cond[i], prior[i])]) for i in range(n)]
    return {"n": n, "auc": separation(cond, gold), "acc": sum(p == g for p, g in zip(pick, gold)) / n,
            "acc_prior": sum(argmax(prior[i]) == gold[i] for i in range(n)) / n,
            "acc_pmi": sum(p == g for p, g in zip(pmi, gold)) / n,
            "acc_anti_prior": sum(argmax([-p for p in prior[i]]) == gold[i] for i in range(n)) / n,
            "prior_gap": sum(gaps) / n, "errors": len(errors), "tilted": len(tilted)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    model, tokenizer = unmask.load(args.model)
    lines = ["| task | n | acc w=0 | acc prior | acc PMI | anti-prior | prior gap (nats) | errors at w=0 | "
             "of them, prior favours the pick | AUC |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.tasks.split(","):
        task = get_task(name)
        if task.kind != "choice":
            continue
        items = load_items(task, limit=args.limit)
        r = prior_row(items, *choice_scores(model, tokenizer, items))
        lines.append(f"| {name} | {r['n']} | {100 * r['acc']:.1f} | {100 * r['acc_prior']:.1f} | "
                     f"{100 * r['acc_pmi']:.1f} | {100 * r['acc_anti_prior']:.1f} | {r['prior_gap']:+.2f} | {r['errors']} | "
                     f"{r['tilted']} ({100 * r['tilted'] / max(r['errors'], 1):.0f} %) | "
                     f"{'–' if r['auc'] is None else format(r['auc'], '.2f')} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
