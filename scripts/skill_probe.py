"""Can more verification and two-hop text teach the bundled model BoolQ-like and OBQA-like items?

The bundled model answers ARC-like questions about held-out people at 92 % but BoolQ-like and
OBQA-like items at chance, even on the *control* suite (qa people, the corpus's own phrasings). This
probe asks whether that is a matter of exposure: it writes a corpus in which yes/no questions and
two-hop conclusions are far denser than in the recipe's mix (35 % of documents are a short
biography followed by one to three yes/no questions about other facts, 20 % two-hop conclusions,
15 % the recipe's QA documents, 30 % the recipe's own mix), all about qa people only, so the
held-out contract still holds. Continue the bundled model's run on it and score both suites:

    python scripts/skill_probe.py --docs 150000 --out runs/probe/train.jsonl
    unmask train --config recipes/knowledge_model.toml --data runs/probe/train.jsonl --out-dir runs/probe/run \\
        --init-from runs/knowledge_model/step-011000 --lr 1e-3 --min-lr 1e-4 --warmup 50 --decay-frac 0.3 \\
        --max-steps 1500 --save-every 500
    python -m unmask.data.knowledge --suite-dir runs/probe/control --docs 0 --control
    unmask eval --model runs/probe/run --tasks know_boolq,know_obqa,know_arc --cfg-scale 0 [--data-dir runs/probe/control]

Measured (docs/verification.md): after 1,500 steps (6.1 M tokens, about 100,000
yes/no answers) both skills stay at chance on both suites, while held-out ARC-like falls from 92 %
as the biographies thin out.

`--score-corpus` asks the sharper question of a model: does it answer the yes/no questions of its
own training corpus, verbatim (context up to "Answer:", " yes" against " no" by `exact_bound`)?

    python scripts/skill_probe.py --score-corpus runs/knowledge/train.jsonl --n 400 [--model DIR]

`--verify` separates recall from comparison: yes/no items whose passage leaves the asked fact out
(closed book: recall, then compare) or states it (in context: compare two values on the page,
nothing to recall), about held-out people in the suite's phrasings and about qa people in the
corpus's. `--stated F` writes a corpus in which a fraction F of the documents are such in-context
items about qa people (the rest the mix above), to ask whether the comparison alone can be taught:

    python scripts/skill_probe.py --verify --n 400 [--model DIR]
    python scripts/skill_probe.py --docs 100000 --stated 1 --out runs/stated/train.jsonl

Measured (docs/verification.md): the bundled model is at chance in all four cells
(47–51 %); 1,500 steps on `--stated 1`, 3,000 on `--stated 0.5` and 4,500 more on `--stated 1`
(lr 1e-3) bring the stated items to 99.2 % in the corpus's phrasings and 66.0 % in the suite's,
closed-book ones only to 64.8 % / 51.5 %, while held-out ARC-like falls to 10.9 %. With the
recipe's own documents as half the text, knowledge stays and the comparison never appears.

`--reasoned F` writes a corpus in which a fraction F of the documents are yes/no items about qa
people whose answer states the asked fact first ("Answer: Hugo Ross has a pet rabbit, so no."),
the rest the recipe's own documents; `--verify-reasoned` measures the two steps apart, for held-out
people in the suite's phrasings and qa people in the corpus's: whether the model writes the fact
(greedy, `--gen-length` tokens in blocks of `--block-length`, `--cfg-scale`), and whether, given the
true fact, it then says " yes" or " no" rightly (likelihood):

    python scripts/skill_probe.py --docs 200000 --reasoned 0.5 --out runs/reasoned/train.jsonl
    python scripts/skill_probe.py --verify-reasoned --n 400 [--model DIR]

Measured (docs/verification.md): 4,500 steps from the shipped weights on `--reasoned 0.5` (lr 1e-3 -> 1e-4)
keep ARC-like at 91.4 % and teach the fact (93.0 % for qa people, 35.8 % held out), while the
verdict after the true fact stays at chance (51.2 % / 48.5 %).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re

import unmask
from unmask.data import knowledge as K
from unmask.likelihood import exact_bound
from unmask.sampling.text import generate_text
from unmask.data.world import write_jsonl


def yesno_document(rng: random.Random, world: K.World, p: K.Person) -> str:
    """A short biography, then one to three yes/no questions about facts it does not state."""
    asked = rng.sample(K.ATTRIBUTES, rng.choice([1, 2, 3]))
    lines = []
    for a in asked:
        truth = rng.random() < 0.5
        v = world.asked_value(rng, p, a, truth)
        lines.append(f"Question: {K.yesno(rng, p, a, v, False)}?\nAnswer: {'yes' if truth else 'no'}")
    others = rng.sample([x for x in K.ATTRIBUTES if x not in asked], rng.choice([1, 2]))
    return K.biography(rng, p, others) + "\n" + "\n".join(lines)


def probe_document(rng: random.Random, world: K.World, stated: float = 0.0, reasoned: float = 0.0) -> str:
    if reasoned:  # reasoned yes/no items about qa people, the rest the recipe's own documents
        if rng.random() < reasoned:
            return K.yes_no_document(rng, world, world.draw(rng, 1, world.qa)[0], reasoned=True)
        return K.document(rng, world)
    if stated and rng.random() < stated:
        person = world.draw(rng, 1, world.qa)[0]
        return K.yes_no_document(rng, world, person, stated=True, name=person.full)
    kind = rng.random()
    if kind < 0.35:
        return yesno_document(rng, world, world.draw(rng, 1, world.qa)[0])
    if kind < 0.55:
        return K.two_hop_document(rng, world.draw(rng, 1, world.qa)[0])
    if kind < 0.70:
        return K.qa_document(rng, world, world.draw(rng, 1, world.qa)[0])
    return K.document(rng, world)


YES_NO = re.compile(r"^(?P<context>.*\nAnswer:) (?P<answer>yes|no)$", re.S)


def trained_yes_no(model, tokenizer, documents, pattern: re.Pattern = YES_NO) -> tuple[int, int, int]:
    """(documents scored, answered right, answered "yes") over the documents that `pattern` matches
    (its `context`, then the `answer`: plain yes/no items, or REASONED's verdict after the fact):
    the model picks the likelier of " yes" and " no" after the document's own context."""
    yes, no = tokenizer(" yes").input_ids, tokenizer(" no").input_ids
    scored = right = said_yes = 0
    for text in documents:
        match = pattern.match(text)
        if not match:
            continue
        context = tokenizer(match["context"]).input_ids
        says_yes = exact_bound(model, context, yes).value > exact_bound(model, context, no).value
        scored, said_yes = scored + 1, said_yes + says_yes
        right += says_yes == (match["answer"] == "yes")
    return scored, right, said_yes


def verification_table(model, tokenizer, n: int) -> str:
    """Accuracy on `n` verification items per cell: closed book / in context, held-out people in
    the suite's phrasings / qa people in the corpus's (the same draws for every model)."""
    world = K.World.load()
    rows = ["| people (phrasings) | closed book | fact stated in the passage |", "|---|---|---|"]
    for group, people, suite in (("held-out (suite)", world.heldout, True), ("qa (corpus)", world.qa, False)):
        cells = []
        for stated in (False, True):
            rng = random.Random(f"verify:{group}:{stated}")
            docs = [K.yes_no_document(rng, world, p, suite, stated, p.full) for p in rng.choices(people, k=n)]
            scored, right, said_yes = trained_yes_no(model, tokenizer, docs)
            cells.append(f"{100 * right / scored:.1f} % (yes {said_yes})")
        rows.append(f"| {group} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


REASONED = re.compile(r"^(?P<context>(?P<prompt>.*\nQuestion: .*\?\nAnswer:) (?P<fact>.*), so) "
                      r"(?P<answer>yes|no)\.$", re.S)


def named_values(text: str) -> dict[str, str]:
    """{attribute: value} for every value of the world named in `text` (whole words)."""
    return {a: v for a in K.ATTRIBUTES for v in K.VALUES[a] if re.search(rf"\b{re.escape(v)}\b", text)}


def reasoned_answers(model, tokenizer, documents, **sampler) -> tuple[int, int, int]:
    """(items, facts written right, verdicts right after the true fact) over reasoned yes/no
    documents. The two steps apart: the model writes the answer after "Answer:" (`generate`,
    greedy) and its first line is read for the person's value; then, with the true fact written
    for it ("... loves to eat soup, so"), it picks the likelier of " yes" and " no" (`exact_bound`),
    which is the comparison alone, two values side by side on the page."""
    items = [m for m in map(REASONED.match, documents) if m]
    texts = generate_text(model, tokenizer, [m["prompt"] for m in items], batch_size=64, **sampler)
    written = 0
    for m, text in zip(items, texts):
        (attr, value), = named_values(m["fact"]).items()
        written += named_values(text.split("\n")[0].split(", so")[0]).get(attr) == value
    _, right, _ = trained_yes_no(model, tokenizer, [m.string for m in items], REASONED)
    return len(items), written, right


def reasoned_table(model, tokenizer, n: int, **sampler) -> str:
    """Reasoned verification, closed book, `n` items per row: held-out people in the suite's
    phrasings, qa people in the corpus's (the same draws for every model)."""
    world = K.World.load()
    rows = ["| people (phrasings) | fact written right | verdict right after the true fact |", "|---|---|---|"]
    for group, people, suite in (("held-out (suite)", world.heldout, True), ("qa (corpus)", world.qa, False)):
        rng = random.Random(f"reasoned:{group}")
        docs = [K.yes_no_document(rng, world, p, suite, name=p.full, reasoned=True) for p in rng.choices(people, k=n)]
        items, written, right = reasoned_answers(model, tokenizer, docs, **sampler)
        rows.append(f"| {group} | {100 * written / items:.1f} % | {100 * right / items:.1f} % |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=150_000)
    job = ap.add_mutually_exclusive_group(required=True)
    job.add_argument("--out", help="the corpus to write (.jsonl)")
    job.add_argument("--score-corpus", help="a training corpus (.jsonl) whose yes/no documents the model answers")
    job.add_argument("--verify", action="store_true", help="closed-book against in-context verification")
    job.add_argument("--verify-reasoned", action="store_true",
                     help="closed-book verification with the answer written out (fact, then verdict)")
    ap.add_argument("--n", type=int, default=400, help="yes/no documents to score (--score-corpus, --verify: per cell)")
    ap.add_argument("--stated", type=float, default=0.0,
                    help="fraction of the corpus that is in-context verification items (--out)")
    ap.add_argument("--reasoned", type=float, default=0.0,
                    help="fraction of the corpus that is reasoned verification items, the rest the recipe's (--out)")
    ap.add_argument("--gen-length", type=int, default=24, help="tokens written per answer (--verify-reasoned)")
    ap.add_argument("--block-length", type=int, default=8, help="semi-autoregressive block (--verify-reasoned)")
    ap.add_argument("--cfg-scale", type=float, default=0.0, help="guidance while writing (--verify-reasoned)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    args = ap.parse_args()
    if args.score_corpus or args.verify or args.verify_reasoned:
        model, tokenizer = unmask.load(args.model) if args.model else unmask.load()
    if args.verify_reasoned:
        print(reasoned_table(model, tokenizer, args.n, steps=args.gen_length, gen_length=args.gen_length,
                             block_length=args.block_length, cfg_scale=args.cfg_scale))
        return
    if args.verify:
        print(verification_table(model, tokenizer, args.n))
        return
    if args.score_corpus:
        with open(args.score_corpus) as f:
            texts = (json.loads(line)["text"] for line in f)
            scored, right, said_yes = trained_yes_no(model, tokenizer, itertools.islice(
                (t for t in texts if YES_NO.match(t)), args.n))
        print(f"{scored} yes/no documents of {args.score_corpus}: right {right} ({100 * right / scored:.1f} %), "
              f"answered yes {said_yes}")
        return
    rng, world = random.Random("probe:0"), K.World.load()
    print(f"wrote {write_jsonl(args.out, ({'text': probe_document(rng, world, args.stated, args.reasoned)} for _ in range(args.docs)))} documents to {args.out}")


if __name__ == "__main__":
    main()
