"""Where guidance changes a generated answer: every held-out person, every fact, at w = 0 and w.

For each of the 200 held-out people of the world and each of the six facts, the first training
phrasing of the question ("Question: What pet does X have?\nAnswer:"; the main job's format) is
answered greedily (gen 4, one block, one token per step) at w = 0 and at w; an answer is right when
its first word is the person's value. Prints the totals (right at each w, answers guidance fixes
and breaks) and the changed answers of the least-mentioned people first, the README's examples.

    python scripts/guidance_examples.py [--model DIR] [--scale 1] [--show 6]
"""

from __future__ import annotations

import argparse

import unmask
from unmask.bench import answer_matches, first_word
from unmask.data import knowledge as K
from unmask.data.world import QUESTIONS, _fill
from unmask.sampling.text import generate_text


def questions(people: list[dict]) -> list[tuple[str, str, float]]:
    """(prompt, truth, mentions) for every person and fact, in the first training phrasing."""
    out = []
    for row in people:
        p = K.as_person(row)
        for attr in K.ATTRIBUTES:
            template = next(q for q, held in QUESTIONS[attr] if not held)
            out.append((f"Question: {_fill(template, p, attr, name=p.full)}\nAnswer:", p.facts[attr], row["mentions"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--show", type=int, default=6, help="changed answers to print")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    model, tok = unmask.load(args.model)
    items = questions([r for r in K.load_population() if r["split"] == "heldout"])
    prompts = [q for q, _, _ in items]
    answers = {w: generate_text(model, tok, prompts, batch_size=args.batch, steps=4, gen_length=4, block_length=4,
                                cfg_scale=w) for w in (0.0, args.scale)}
    right = {w: [answer_matches(t, truth) for t, (_, truth, _) in zip(texts, items)] for w, texts in answers.items()}
    fixed = sum(b and not a for a, b in zip(right[0.0], right[args.scale]))
    broken = sum(a and not b for a, b in zip(right[0.0], right[args.scale]))
    n = len(items)
    print(f"{n} questions: w = 0 right {100 * sum(right[0.0]) / n:.1f} %, w = {args.scale:g} right "
          f"{100 * sum(right[args.scale]) / n:.1f} %; guidance fixes {fixed}, breaks {broken}\n")
    print(f"| prompt | truth | w = 0 | w = {args.scale:g} |\n|---|---|---|---|")
    changed = sorted((i for i in range(n) if right[0.0][i] != right[args.scale][i]), key=lambda i: items[i][2])
    for i in changed[:args.show]:
        prompt, truth, _ = items[i]
        first = [first_word(answers[w][i]) for w in (0.0, args.scale)]
        shown = prompt.replace("\n", "\\n")
        print(f"| `{shown}` | {truth} | {first[0]} | {first[1]} |")


if __name__ == "__main__":
    main()
