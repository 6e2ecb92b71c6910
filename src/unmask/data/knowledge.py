"""World v2: a fixed population whose facts a tiny MDM memorises, and a suite that asks about them.

Why this world
--------------
SMDM's zero-shot tasks (ARC-e, BoolQ, OBQA, LAMBADA) are answered from what a model absorbed in
pretraining, with the question as the prompt c. A 1M-parameter MDM on two CPU cores can memorise
the fixed facts of a few hundred people (a local name -> value association) where it could not
learn to read an answer out of a passage, so this world tests *knowledge*: 400 people
(``assets/world/people.jsonl``) with fixed facts, described across many documents in varied
phrasings and orders.

Unsupervised CFG changes the ranking of one-token choices only through the unconditional term
p(choice | prompt masked), the prior of each choice. The world therefore has real-language-like
priors, so that term differs between choices: values are drawn Zipf-like (far more dogs than
owls), some people are mentioned far more often than others (facts rare in the corpus as well as
common ones), and the suite's distractors are drawn by the world's value frequencies, as
plausible distractors are on real benchmarks (the "surface form competition" PMI scoring corrects).
The ARC- and PIQA-like items ask about every value about equally often (``Asking.fact``), so the
test's answers do not follow the corpus's prior, as a benchmark's do not.

The held-out contract (checked by the tests)
--------------------------------------------
1. Every person is ``qa`` or ``heldout`` (alternating down the mention ranking, so both splits
   span common and rare people). Question-and-answer text, yes/no questions, two-hop conclusions
   and how-to answers appear in the corpus **only about qa people**; heldout people appear only
   in biographies and stories. The suite asks only about heldout people, so it measures knowledge
   extracted from biographies, not memorised QA strings.
2. The suite's question phrasings (``SUITE_*`` templates and v1's held-out ``QUESTIONS``/``YESNO``
   phrasings) never appear in training.
3. Corpus and suite draw from separate seeded streams; the same seed gives byte-identical output.

World knowledge the same in every document: each town lies in one region (v1's ``REGION_OF``),
each kind of pet eats one thing (``DIET``); OBQA-like items state such facts as their open book
and ask for the two-hop answer about a person.

CLI::

    python -m unmask.data.knowledge --out runs/knowledge --docs 600000   # corpus (+ suite/)
    python -m unmask.data.knowledge --out runs/knowledge_book --docs 100000 --seed 1 --open-book 0.3 --no-suite
    python -m unmask.data.knowledge --out runs/knowledge_sft --docs 0 --sft 20000 --no-suite
    python -m unmask.data.knowledge --suite-dir src/unmask/assets/suite --docs 0
    python -m unmask.data.knowledge --suite-dir runs/control --docs 0 --control   # the control suite
    python -m unmask.data.knowledge --suite-dir runs/corpus_suite --docs 0 --answers corpus   # the first v2 suite
    python -m unmask.data.knowledge --population src/unmask/assets/world/people.jsonl --docs 0 --no-suite
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from pathlib import Path

from .world import (
    FACT_TEMPLATES, FEMALE_NAMES, MALE_NAMES, QUESTIONS, REGION_OF, REGIONS, SURNAMES, VALUES, YESNO, Person,
    _answer_sentence, _article, _cap, _fill, _region_fact, write_jsonl,
)

POPULATION_PATH = Path(__file__).resolve().parents[1] / "assets" / "world" / "people.jsonl"
N_PEOPLE = 400
ATTRIBUTES = ("town", "job", "pet", "colour", "food", "object")
# How often a biography states each attribute: some facts are common in the corpus, some rare.
MENTION_RATE = {"town": 0.85, "job": 0.8, "pet": 0.7, "colour": 0.55, "food": 0.5, "object": 0.4}
VALUE_ZIPF = 1.0        # value of rank r (v1's list order) drawn with weight 1 / (r + 1)
PERSON_OFFSET = 40      # person of mention rank r appears with weight 1 / (r + PERSON_OFFSET)

DIET = {
    "dog": "meat", "cat": "fish", "rabbit": "carrots", "parrot": "seeds", "hamster": "seeds",
    "turtle": "leaves", "goat": "grass", "horse": "hay", "pony": "hay", "goldfish": "flakes",
    "lizard": "insects", "owl": "mice", "duck": "bread", "pig": "corn", "mouse": "cheese", "snake": "mice",
}

# ---------------------------------------------------------------------------
# The population
# ---------------------------------------------------------------------------


def zipf_weights(n: int, offset: float = 1.0, exponent: float = 1.0) -> list[float]:
    """Weights 1 / (rank + offset)^exponent for ranks 0..n-1 (unnormalised)."""
    return [1.0 / (r + offset) ** exponent for r in range(n)]


def make_population(seed: int = 0, n: int = N_PEOPLE) -> list[dict]:
    """The fixed people of the world, most-mentioned first.

    Names come from v1's name lists (distinct full names); every value is drawn Zipf-like over
    v1's value order, independently per person and attribute. ``mentions`` is the person's
    relative weight in the corpus; splits alternate down the ranking."""
    rng = random.Random(f"population:{seed}")
    names = [(f, s, "f") for f in FEMALE_NAMES for s in SURNAMES] + [(f, s, "m") for f in MALE_NAMES for s in SURNAMES]
    chosen = rng.sample(names, n)
    weights = {a: zipf_weights(len(VALUES[a]), 1.0, VALUE_ZIPF) for a in ATTRIBUTES}
    people = []
    for rank, (first, surname, gender) in enumerate(chosen):
        facts = {a: rng.choices(VALUES[a], weights[a])[0] for a in ATTRIBUTES}
        people.append({"name": f"{first} {surname}", "gender": gender, "facts": facts,
                       "split": "qa" if rank % 2 == 0 else "heldout",
                       "mentions": round(1.0 / (rank + PERSON_OFFSET), 6)})
    return people


def load_population(path: str | os.PathLike = POPULATION_PATH) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_person(row: dict) -> Person:
    first, surname = row["name"].split(" ")
    return Person(first, surname, row["gender"], dict(row["facts"]))


def value_frequencies(people: list[dict]) -> dict[str, Counter]:
    """How many people hold each value, per attribute: the prior the suite draws distractors by."""
    return {a: Counter(p["facts"][a] for p in people) for a in ATTRIBUTES}


@dataclass
class World:
    """The population split and weighted, ready to draw documents from."""

    qa: list[Person]
    heldout: list[Person]
    everyone: list[Person]
    weights: dict[str, float]       # full name -> corpus weight
    frequencies: dict[str, Counter]
    # cumulative weights of the pools every document draws from, summed once (draw runs per document)
    _cumulative: dict[int, list[float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cumulative = {id(pool): self._cumulative_weights(pool) for pool in (self.everyone, self.qa)}

    def _cumulative_weights(self, people: list[Person]) -> list[float]:
        return list(accumulate(self.weights[p.full] for p in people))

    @classmethod
    def load(cls, path: str | os.PathLike = POPULATION_PATH) -> "World":
        rows = load_population(path)
        everyone = [as_person(r) for r in rows]
        return cls(qa=[p for p, r in zip(everyone, rows) if r["split"] == "qa"],
                   heldout=[p for p, r in zip(everyone, rows) if r["split"] == "heldout"],
                   everyone=everyone, weights={r["name"]: r["mentions"] for r in rows},
                   frequencies=value_frequencies(rows))

    def draw(self, rng: random.Random, k: int = 1, pool: list[Person] | None = None) -> list[Person]:
        """k people with distinct first names, by their corpus weight (from ``pool`` if given)."""
        people = self.everyone if pool is None else pool
        cumulative = self._cumulative.get(id(people)) or self._cumulative_weights(people)
        chosen: list[Person] = []
        while len(chosen) < k:
            p = rng.choices(people, cum_weights=cumulative)[0]
            if p not in chosen and all(p.first != q.first for q in chosen):
                chosen.append(p)
        return chosen

    def distractors(self, rng: random.Random, attr: str, exclude: set[str], k: int) -> list[str]:
        """k values other than ``exclude``, drawn without replacement by how common they are."""
        freq = self.frequencies[attr]
        pool = [v for v in VALUES[attr] if v not in exclude and freq[v] > 0]
        out: list[str] = []
        while len(out) < k:
            v = rng.choices(pool, [freq[x] for x in pool])[0]
            out.append(v)
            pool.remove(v)
        return out

    def asked_value(self, rng: random.Random, p: Person, attr: str, truth: bool) -> str:
        """The value a yes/no question about ``p``'s ``attr`` names: the true one, or a distractor."""
        return p.facts[attr] if truth else self.distractors(rng, attr, {p.facts[attr]}, 1)[0]


# ---------------------------------------------------------------------------
# Templates (v1's fact templates and questions are reused; these are v2's own)
# ---------------------------------------------------------------------------

OPENERS = ["", "", "", "Here is a short text about {N}.", "This is about {N}.", "Let me tell you about {N}."]
FILLERS = ["It was a quiet day.", "The market was busy.", "Everyone in the area knows each other.",
           "The road between the towns is long.", "The people there are kind.", "It rained a lot that week."]

DIET_FACTS = ["{Ap} eats {d}.", "{Ap} likes to eat {d}.", "Every {pet} eats {d}."]
# Two-hop conclusions: training (qa people) vs suite (heldout people) stems.
REGION_STEMS = ["So {N} lives in the", "{NP} home is in the"]
SUITE_REGION_STEMS = ["This means that {N} lives in the", "The region where {N} lives is the"]
DIET_STEMS = ["So {NP} pet eats", "The pet of {N} eats"]
SUITE_DIET_STEMS = ["This means that {NP} pet eats", "Every day, {N} feeds {p} pet some"]

HOWTO = {  # (training goal, suite goal, solution)
    "town": ("How can you visit {N} at home?", "How do you get to the home of {N}?", "Travel to {v}."),
    "job": ("How can you find {N} at work?", "How do you meet {N} at work?", "Ask for the {v} of the town."),
    "pet": ("How can you make {NP} pet happy?", "How do you please the pet of {N}?", "Bring a treat for the {v}."),
    "colour": ("How can you choose a gift that {N} will love?", "How do you pick a present for {N}?",
               "Buy something that is {v}."),
    "food": ("How can you cook a meal that {N} will enjoy?", "How do you make dinner for {N}?", "Serve some {v}."),
    "object": ("How can you help {N} fix {p} favourite thing?", "How do you repair what {N} loves most?",
               "Bring tools to fix the {v}."),
}

# Stories with recurring names: the last word is a name or value mentioned earlier (LAMBADA-like).
# {A}/{B}: full names, {a}/{b}: first names, {ap}/{bp}: possessive pronouns, {A_pet} etc.: facts.
STORY_OPENINGS = [
    "{A} and {B} met at the market in {A_town}.",
    "One morning, {A} went to see {B} in {B_town}.",
    "{A} and {B} are old friends.",
    "{B} invited {A} for lunch.",
]
STORY_MIDDLES = [
    "{a} talked about {ap} {A_pet}, and {b} talked about work as {B_av_job}.",
    "They ate some {A_food} and talked for a long time.",
    "{b} showed {a} {bp} {B_object}.",
    "{a} wore {A_av_colour} coat that day.",
    "It was a warm day, and they walked by the river.",
]
STORY_ENDINGS = [  # (final sentence without its last word, which field the last word is)
    ("At the end of the day, {a} said goodbye to", "b"),
    ("Before leaving, {b} shook hands with", "a"),
    ("On the way home, {a} kept thinking about", "b"),
    ("The next week, {b} wrote a letter to", "a"),
    ("Back at home, {a} fed {ap}", "A_pet"),
    ("That evening, {b} played with {bp}", "B_object"),
]


def _story_fields(a: Person, b: Person) -> dict[str, str]:
    fields = {"A": a.full, "B": b.full, "a": a.first, "b": b.first, "ap": a.poss, "bp": b.poss}
    for key, p in (("A", a), ("B", b)):
        fields.update({f"{key}_{attr}": v for attr, v in p.facts.items()})
        fields.update({f"{key}_av_{attr}": _article(v) for attr, v in p.facts.items()})
    return fields


def story(rng: random.Random, a: Person, b: Person) -> tuple[str, str]:
    """(a story about a and b ending before its last word, that last word)."""
    fields = _story_fields(a, b)
    middles = rng.sample(STORY_MIDDLES, rng.choice([1, 2, 2, 3]))
    ending, last = rng.choice(STORY_ENDINGS)
    if not any("{" + last + "}" in m for m in middles):  # a value ending is stated earlier in the story
        middles += [m for m in STORY_MIDDLES if "{" + last + "}" in m]
    lines = [rng.choice(STORY_OPENINGS)] + middles + [ending]
    return " ".join(_cap(t.format(**fields)) for t in lines), fields[last]


# ---------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------


def _name(rng: random.Random, p: Person, suite: bool = False) -> str:
    """The name a question uses: always the full name in the suite (first names are shared by
    several people), in training mostly the full name."""
    return p.full if suite or rng.random() < 0.8 else p.first


def biography(rng: random.Random, p: Person, attrs: list[str] | None = None) -> str:
    """Some of a person's facts in random order: full name first, then pronoun / first / full name."""
    if attrs is None:
        attrs = [a for a in ATTRIBUTES if rng.random() < MENTION_RATE[a]] or [rng.choice(ATTRIBUTES)]
        rng.shuffle(attrs)
    opener = rng.choice(OPENERS).format(N=p.full)
    sents = [opener] if opener else []
    for i, a in enumerate(attrs):
        if i == 0 and not opener:
            subj = p.full
        else:
            r = rng.random()
            subj = p.subj if r < 0.4 else (p.first if r < 0.7 else p.full)
        sents.append(_fill(rng.choice(FACT_TEMPLATES[a]), p, a, name=p.full, subj=subj))
        if rng.random() < 0.06:
            sents.append(rng.choice(FILLERS))
    return " ".join(sents)


def question(rng: random.Random, p: Person, attr: str, suite: bool, name: str | None = None) -> str:
    qs = [q for q, held in QUESTIONS[attr] if held == suite]
    return _fill(rng.choice(qs), p, attr, name=name or _name(rng, p, suite))


def yesno(rng: random.Random, p: Person, attr: str, value: str, suite: bool, name: str | None = None) -> str:
    qs = [q for q, held in YESNO[attr] if held == suite]
    q = _fill(rng.choice(qs), p, attr, name=name or _name(rng, p, suite), value=value)
    return q[0].lower() + q[1:]


def diet_fact(rng: random.Random, pet: str) -> str:
    return _cap(rng.choice(DIET_FACTS).format(Ap=_article(pet), pet=pet, d=DIET[pet]))


def two_hop_stem(rng: random.Random, p: Person, kind: str, suite: bool, name: str | None = None) -> str:
    stems = {("region", False): REGION_STEMS, ("region", True): SUITE_REGION_STEMS,
             ("diet", False): DIET_STEMS, ("diet", True): SUITE_DIET_STEMS}[kind, suite]
    return _fill(rng.choice(stems), p, name=name or _name(rng, p, suite))


def howto(p: Person, attr: str, suite: bool, name: str, value: str | None = None) -> tuple[str, str]:
    train_goal, suite_goal, solution = HOWTO[attr]
    return (_fill(suite_goal if suite else train_goal, p, attr, name=name),
            _fill(solution, p, attr, name=name, value=value))


# ---------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KnowledgeMix:
    """Fractions of the corpus's document kinds; the rest are single biographies.

    `open_book`: the fraction of documents that are `open_book_document`s about qa people (the
    first fact stated in a fraction `stated` of them); the other documents are drawn by the other
    fractions as in the mix without them. 0 (the default) is the bundled model's corpus, byte for
    byte; `--open-book` sets it for the continuation experiment of docs/verification.md ("Two hops")."""

    two_bios: float = 0.10
    stories: float = 0.10
    world_facts: float = 0.05
    qa: float = 0.20
    open_book: float = 0.0
    stated: float = 0.3


def yes_no_document(rng: random.Random, world: World, p: Person, suite: bool = False, stated: bool = False,
                    name: str | None = None, reasoned: bool = False) -> str:
    """One or two of p's facts, then a yes/no question about another fact (true half of the time),
    in the suite's phrasings if `suite`, else the corpus's. With `stated` the passage states the
    asked fact too, so the answer needs only the two values on the page compared, nothing recalled
    (the verification probe of scripts/skill_probe.py). With `reasoned` the answer first states the
    asked fact, then the verdict ("Answer: Hugo Ross has a pet rabbit, so no."): recall written out
    as a chain of thought, so the verdict compares two values on the page."""
    a, *others = rng.sample(ATTRIBUTES, 3)
    truth = rng.random() < 0.5
    v = world.asked_value(rng, p, a, truth)
    facts = others[: rng.choice([1, 2]) - stated] + [a] * stated
    if stated:
        rng.shuffle(facts)
    passage, question = biography(rng, p, facts), yesno(rng, p, a, v, suite, name)
    verdict = "yes" if truth else "no"
    if reasoned:
        fact = _fill(rng.choice(FACT_TEMPLATES[a]), p, a, name=name or p.full)
        verdict = f"{fact[:-1]}, so {verdict}."
    return f"{passage}\nQuestion: {question}?\nAnswer: {verdict}"


def qa_document(rng: random.Random, world: World, p: Person) -> str:
    """Question-answer text about one qa person, in the suite's formats with training phrasings."""
    kind = rng.random()
    if kind < 0.45:  # ARC-like lines: "Question: ...\nAnswer: value"
        attrs = rng.sample(ATTRIBUTES, rng.choice([1, 2, 3]))
        return "\n".join(f"Question: {question(rng, p, a, False)}\nAnswer: {p.facts[a]}" for a in attrs)
    if kind < 0.70:  # BoolQ-like: a short passage, then a yes/no question
        return yes_no_document(rng, world, p)
    if kind < 0.85:
        return two_hop_document(rng, p)
    a = rng.choice(ATTRIBUTES)
    goal, solution = howto(p, a, False, _name(rng, p))
    return f"Question: {goal}\nAnswer: {solution}"


def two_hop_document(rng: random.Random, p: Person) -> str:
    """A qa person's first fact, the world fact it leads to, and the conclusion: the person's town
    and where it lies, or the pet and what it eats (training stems)."""
    if rng.random() < 0.5:
        return (biography(rng, p, ["town"]) + " " + _region_fact(rng, p.facts["town"]) + " "
                + two_hop_stem(rng, p, "region", False) + " " + REGION_OF[p.facts["town"]] + ".")
    return (biography(rng, p, ["pet"]) + " " + diet_fact(rng, p.facts["pet"]) + " "
            + two_hop_stem(rng, p, "diet", False) + " " + DIET[p.facts["pet"]] + ".")


def open_book(rng: random.Random, p: Person, kind: str) -> tuple[str, list[str], str]:
    """(book, choices, answer) of an OBQA-like question about `p`: the book names four towns, one
    per region, or four pets of distinct diets, the person's among them; the choices are the four
    regions or those diets, the answer the person's region ("region") or pet's diet ("diet")."""
    if kind == "region":
        answer = REGION_OF[p.facts["town"]]
        towns = [p.facts["town"]] + [rng.choice([t for t in VALUES["town"] if REGION_OF[t] == r])
                                     for r in REGIONS if r != answer]
        rng.shuffle(towns)
        return " ".join(_region_fact(rng, t) for t in towns), list(REGIONS), answer
    answer = DIET[p.facts["pet"]]
    pets = [p.facts["pet"]]
    for pet in rng.sample(VALUES["pet"], len(VALUES["pet"])):
        if len(pets) < 4 and DIET[pet] not in {DIET[x] for x in pets}:
            pets.append(pet)
    rng.shuffle(pets)
    return " ".join(diet_fact(rng, x) for x in pets), [DIET[x] for x in pets], answer


def open_book_document(rng: random.Random, p: Person, stated: float) -> str:
    """An open book and the two-hop conclusion about a qa person (training stems); with
    probability `stated` the person's first fact (town or pet) comes first.

    Why both: in `two_hop_document` the first fact is always in the text, so the conclusion can be
    read off the page (town, then the book's sentence about that town) and the model never has to
    recall the fact, which is what a question about a held-out person needs. Without it, the
    conclusion takes the memorised fact and the book together, as the OBQA-like items do."""
    kind = "region" if rng.random() < 0.5 else "diet"
    first = biography(rng, p, ["town" if kind == "region" else "pet"]) + " " if rng.random() < stated else ""
    book, _, answer = open_book(rng, p, kind)
    return first + book + " " + two_hop_stem(rng, p, kind, False) + " " + answer + "."


def _world_document(rng: random.Random) -> str:
    """Facts that hold in every document: where towns lie, what pets eat."""
    if rng.random() < 0.5:
        return " ".join(_region_fact(rng, t) for t in rng.sample(VALUES["town"], rng.choice([2, 3, 4, 5])))
    return " ".join(diet_fact(rng, x) for x in rng.sample(VALUES["pet"], rng.choice([2, 3, 4])))


def document(rng: random.Random, world: World, mix: KnowledgeMix = KnowledgeMix()) -> str:
    if mix.open_book and rng.random() < mix.open_book:
        return open_book_document(rng, world.draw(rng, 1, world.qa)[0], mix.stated)
    kind = rng.random()
    if kind < mix.qa:
        return qa_document(rng, world, world.draw(rng, 1, world.qa)[0])
    kind -= mix.qa
    if kind < mix.world_facts:
        return _world_document(rng)
    kind -= mix.world_facts
    if kind < mix.stories:
        text, last = story(rng, *world.draw(rng, 2))
        return text + " " + last + "."
    kind -= mix.stories
    if kind < mix.two_bios:
        return "\n".join(biography(rng, p) for p in world.draw(rng, 2))
    return biography(rng, world.draw(rng, 1)[0])


def _corpus_part(n: int, stream: str, population: str, mix: KnowledgeMix) -> list[str]:
    rng, world = random.Random(stream), World.load(population)
    return [document(rng, world, mix) for _ in range(n)]


def generate_corpus(n_documents: int, seed: int = 0, shards: int = 2,
                    population: str | os.PathLike = POPULATION_PATH, mix: KnowledgeMix = KnowledgeMix()) -> list[str]:
    """Training documents: contiguous shards, each from its own stream ("knowledge:<seed>:k/shards"),
    generated in parallel processes; the corpus depends on (seed, shards, population, mix) only."""
    sizes = [n_documents // shards + (k < n_documents % shards) for k in range(shards)]
    jobs = [(size, f"knowledge:{seed}:{k}/{shards}", str(population), mix) for k, size in enumerate(sizes)]
    if shards == 1:
        return _corpus_part(*jobs[0])
    with multiprocessing.Pool(min(shards, os.cpu_count() or 1)) as pool:
        return [doc for part in pool.starmap(_corpus_part, jobs) for doc in part]


# ---------------------------------------------------------------------------
# Instruction pairs for SFT (qa people only, training phrasings)
# ---------------------------------------------------------------------------

# (instruction line, answer style): "word" answers with the value as the suite's items do,
# "sentence" with a full answer sentence.
SFT_INSTRUCTIONS = [("", "word"), ("Answer with one word.\n", "word"), ("Answer in a full sentence.\n", "sentence")]


def sft_pair(rng: random.Random, world: World) -> dict:
    """One prompt/response pair about a qa person: a question (or yes/no question, or how-to goal)
    as the prompt, the answer as the response. Only qa people and training phrasings, so SFT on
    these pairs keeps the suite's held-out contract."""
    p, a = world.draw(rng, 1, world.qa)[0], rng.choice(ATTRIBUTES)
    name = p.full
    instruction, style = rng.choice(SFT_INSTRUCTIONS)
    kind = rng.random()
    if kind < 0.6:
        q = question(rng, p, a, False, name)
        answer = p.facts[a] if style == "word" else _answer_sentence(rng, p, a, name)
    elif kind < 0.85:
        truth = rng.random() < 0.5
        v = world.asked_value(rng, p, a, truth)
        q = _cap(yesno(rng, p, a, v, False, name)) + "?"
        answer = ("yes" if truth else "no") if style == "word" else \
            ("Yes. " if truth else "No. ") + _answer_sentence(rng, p, a, name)
    else:  # a how-to answer is a sentence whatever the instruction asks
        instruction, (q, answer) = "", howto(p, a, False, name)
    return {"prompt": f"{instruction}Question: {q}\nAnswer:", "response": " " + answer}


def generate_sft_pairs(n: int, seed: int = 0, population: str | os.PathLike = POPULATION_PATH) -> list[dict]:
    """`n` SFT pairs from their own seeded stream ("knowledge-sft:<seed>")."""
    rng, world = random.Random(f"knowledge-sft:{seed}"), World.load(population)
    return [sft_pair(rng, world) for _ in range(n)]


# ---------------------------------------------------------------------------
# The suite: held-out people, held-out phrasings, public schemas
# ---------------------------------------------------------------------------

TASKS = ("know_arc", "know_boolq", "know_obqa", "know_lambada", "know_piqa")
SUITE_ITEMS = 312   # per task: the first 62 (20 %) are the dev slice of `unmask eval --cfg-scale auto`, 250 test


LABELS = ["A", "B", "C", "D"]


@dataclass(frozen=True)
class Asking:
    """Whom a suite asks about, and in which phrasings. The suite: heldout people, held-out
    phrasings. The control suite: qa people in the corpus's own phrasings (full names), whose
    answers the corpus states as QA text; a task the model fails there as well is beyond it
    whatever the split, not a failure to transfer knowledge to new people or phrasings."""

    people: list[Person]
    held_out: bool
    balanced: bool = True

    def name(self, p: Person) -> str | None:
        """None: the suite's own choice (always the full name); the control suite fixes it too."""
        return None if self.held_out else p.full

    def fact(self, rng: random.Random) -> tuple[Person, str]:
        """The person and attribute a one-fact item (ARC-, PIQA-like) asks about.

        Balanced (the default): each (person, attribute) pair is weighted by 1 / (how many of the
        asked people hold its value × how many values of that attribute they hold), so every
        attribute is asked about equally often and, within it, every value, while the corpus states
        values Zipf-like and distractors are drawn by frequency. A benchmark asks about what is
        worth asking, not in proportion to how common an answer string is, and this mismatch is
        what gives the unconditional term of CFG something to correct: where the model's
        knowledge is weak its prior pulls towards a common distractor (surface-form competition).
        Unbalanced: person and attribute uniform, so answers are as common as in the world and
        the prior is right on average (the first v2 suite; ``--answers corpus``)."""
        if not self.balanced:
            return rng.choice(self.people), rng.choice(ATTRIBUTES)
        return rng.choices(self._pairs, cum_weights=self._cumulative)[0]

    @cached_property
    def _pairs(self) -> list[tuple[Person, str]]:
        return [(p, a) for p in self.people for a in ATTRIBUTES]

    @cached_property
    def _cumulative(self) -> list[float]:
        held = Counter((a, p.facts[a]) for p, a in self._pairs)   # each attribute weighs the same in all
        kinds = Counter(a for a, _ in held)
        return list(accumulate(1.0 / (held[a, p.facts[a]] * kinds[a]) for p, a in self._pairs))


def _arc_item(rng: random.Random, world: World, ask: Asking, i: int) -> dict:
    p, a = ask.fact(rng)
    choices = world.distractors(rng, a, {p.facts[a]}, 3) + [p.facts[a]]
    rng.shuffle(choices)
    return {"id": f"know_arc/{i:04d}", "question": question(rng, p, a, ask.held_out, ask.name(p)),
            "choices": {"text": choices, "label": LABELS}, "answerKey": LABELS[choices.index(p.facts[a])],
            "meta": {"person": p.full, "attribute": a, "answer": p.facts[a]}}


def _boolq_item(rng: random.Random, world: World, ask: Asking, i: int, truth: bool) -> dict:
    p = rng.choice(ask.people)
    a, *others = rng.sample(ATTRIBUTES, 3)
    v = world.asked_value(rng, p, a, truth)
    return {"idx": i, "question": yesno(rng, p, a, v, ask.held_out, ask.name(p)), "passage": biography(rng, p, others[: rng.choice([1, 2])]),
            "answer": truth, "meta": {"person": p.full, "attribute": a, "asked_value": v, "true_value": p.facts[a]}}


def _obqa_item(rng: random.Random, world: World, ask: Asking, i: int) -> dict:
    """The open book (`open_book`), then a stem asking for the person's region or what the
    person's pet eats."""
    p = rng.choice(ask.people)
    kind = "region" if rng.random() < 0.5 else "diet"
    book, choices, answer = open_book(rng, p, kind)
    return {"id": f"know_obqa/{i:04d}", "question_stem": book + " " + two_hop_stem(rng, p, kind, ask.held_out, ask.name(p)),
            "choices": {"text": choices, "label": LABELS}, "answerKey": LABELS[choices.index(answer)],
            "meta": {"person": p.full, "kind": kind, "answer": answer}}


def _lambada_item(rng: random.Random, world: World, ask: Asking, i: int) -> dict:
    a = rng.choice(ask.people)
    b = world.draw(rng, 1, [q for q in ask.people if q.first != a.first])[0]
    text, last = story(rng, a, b)
    return {"idx": i, "text": text + " " + last, "meta": {"people": [a.full, b.full], "target": last}}


def _piqa_item(rng: random.Random, world: World, ask: Asking, i: int) -> dict:
    p, a = ask.fact(rng)
    name = _name(rng, p, suite=True)
    wrong = world.distractors(rng, a, {p.facts[a]}, 1)[0]
    goal, good = howto(p, a, ask.held_out, name)
    _, bad = howto(p, a, ask.held_out, name, value=wrong)
    label = rng.randrange(2)
    sols = [bad, good] if label else [good, bad]
    return {"idx": i, "goal": goal, "sol1": sols[0], "sol2": sols[1], "label": label,
            "meta": {"person": p.full, "attribute": a, "answer": p.facts[a], "distractor": wrong}}


def generate_suite(seed: int = 1234, n_items: int = SUITE_ITEMS,
                   population: str | os.PathLike = POPULATION_PATH, control: bool = False,
                   balanced: bool = True) -> dict[str, list[dict]]:
    """The v2 suite, one list per task, each in its public twin's schema (ARC, BoolQ, OpenBookQA,
    LAMBADA, PIQA), asking only about heldout people in phrasings training never uses; with
    `control`, the control suite (see `Asking`) from its own stream; `balanced`: see
    `Asking.fact`."""
    world = World.load(population)
    people = world.qa if control else world.heldout
    ask = Asking(people, held_out=not control, balanced=balanced)
    rng = random.Random(f"knowledge-{'control' if control else 'suite'}:{seed}")
    truths = [True] * (n_items // 2) + [False] * (n_items - n_items // 2)
    rng.shuffle(truths)
    return {
        "know_arc": [_arc_item(rng, world, ask, i) for i in range(n_items)],
        "know_boolq": [_boolq_item(rng, world, ask, i, truths[i]) for i in range(n_items)],
        "know_obqa": [_obqa_item(rng, world, ask, i) for i in range(n_items)],
        "know_lambada": [_lambada_item(rng, world, ask, i) for i in range(n_items)],
        "know_piqa": [_piqa_item(rng, world, ask, i) for i in range(n_items)],
    }


def write_suite(suite_dir: str | os.PathLike, seed: int = 1234, n_items: int = SUITE_ITEMS,
                population: str | os.PathLike = POPULATION_PATH, control: bool = False,
                balanced: bool = True) -> dict[str, int]:
    os.makedirs(suite_dir, exist_ok=True)
    suite = generate_suite(seed, n_items, population, control, balanced)
    return {t: write_jsonl(os.path.join(suite_dir, f"{t}.jsonl"), items) for t, items in suite.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m unmask.data.knowledge", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for train.jsonl (and suite/)")
    ap.add_argument("--docs", type=int, default=600_000, help="number of training documents")
    ap.add_argument("--sft", type=int, default=0, help="number of SFT pairs (OUT/sft.jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=2, help="random streams, generated in parallel processes")
    ap.add_argument("--open-book", type=float, default=0.0,
                    help="fraction of documents that are open-book two-hop documents about qa people "
                         "(the continuation experiment of the README: 0.3)")
    ap.add_argument("--population", default=str(POPULATION_PATH),
                    help="the people file to read; with --docs 0 --no-suite, where to write a fresh one")
    ap.add_argument("--suite-seed", type=int, default=1234)
    ap.add_argument("--suite-items", type=int, default=SUITE_ITEMS)
    ap.add_argument("--suite-dir", default=None, help="where to write the suite (default OUT/suite)")
    ap.add_argument("--no-suite", action="store_true")
    ap.add_argument("--control", action="store_true",
                    help="write the control suite instead: qa people in training phrasings (what the model "
                         "can do in distribution)")
    ap.add_argument("--answers", choices=("balanced", "corpus"), default="balanced",
                    help="which answers the ARC- and PIQA-like items ask for: every value about equally "
                         "often (balanced), or as often as the world holds it (corpus: the first v2 suite)")
    args = ap.parse_args(argv)
    if not args.docs and not args.sft and args.no_suite:
        n = write_jsonl(args.population, make_population())
        print(f"wrote {n} people to {args.population}")
        return
    if args.out is None and (args.docs or args.sft or args.suite_dir is None):
        ap.error("--out is required unless --docs 0 --suite-dir DIR")
    if args.docs:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "train.jsonl")
        mix = KnowledgeMix(open_book=args.open_book)
        n = write_jsonl(path, ({"text": t} for t in generate_corpus(args.docs, args.seed, args.shards,
                                                                      args.population, mix)))
        print(f"wrote {n} documents to {path}")
    if args.sft:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "sft.jsonl")
        print(f"wrote {write_jsonl(path, generate_sft_pairs(args.sft, args.seed, args.population))} SFT pairs to {path}")
    if not args.no_suite:
        d = args.suite_dir or os.path.join(args.out, "suite")
        counts = write_suite(d, args.suite_seed, args.suite_items, args.population, args.control,
                             args.answers == "balanced")
        print(f"wrote suite to {d}: {counts}")


if __name__ == "__main__":
    main()
