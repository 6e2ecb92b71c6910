"""A deterministic synthetic world of fictional people, for training and evaluating tiny MDMs.

Why this exists
---------------
unmask ships a tiny default masked diffusion model (a few million parameters,
256-token context) that is trained on CPU in about an hour.  Generic web text
is far too diverse for such a model; instead we generate a small, regular,
licence-free language about fictional people: where they live, their job, pet,
favourite colour and food, their age and what they own.  Each document states
facts in simple prose (several phrasings per fact, names, first names and
pronouns) and then asks and answers questions about them in several formats
(``Question: ... Answer: ...``, BoolQ-like yes/no, how-to continuations,
cloze-like recall sentences, short stories).

The domain is designed so that **the prompt matters**: a question such as
"What is Mira Holt's job?" can only be answered by reading the passage, and
the wrong options are values stated in the same passage for *other* people,
so priors alone cannot answer.  This is exactly the situation in which
unsupervised classifier-free guidance (prompt visible vs. prompt masked) can
help, which is what the evaluation suite measures.

Held-out rule (documented contract, checked by the tests)
---------------------------------------------------------
1. **Names.**  Every (first name, surname) pair is assigned to a split by a
   stable hash: ``zlib.crc32(b"First Surname") % 5 == 0`` means *held out*
   (about 20 % of the pairs).  Training documents and SFT pairs only ever use
   non-held-out pairs; the evaluation suite only ever uses held-out pairs.  So
   every first name and every surname is seen in training, but no person (full
   name) of the suite is, and hence no suite passage can occur in training.
2. **Seeds.**  Each generator seeds its own ``random.Random`` with a string
   that includes a domain tag (``"train:<seed>"``, ``"sft:<seed>"``,
   ``"suite:<seed>"``), so training and suite streams are disjoint even when
   called with the same integer seed.
3. **Question phrasings.**  For each attribute one question phrasing for the
   multiple-choice / QA questions and one for the yes/no questions are
   reserved for the suite (``HELDOUT`` templates); training and SFT never
   use them.  The suite uses all phrasings (held-out ones included).

All generation is pure Python with ``random.Random`` and fixed word lists, so
the same seed always gives byte-identical output across runs and machines.

CLI::

    python -m unmask.data.world --out DIR --docs 40000 --sft 20000
    python -m unmask.data.world --suite-dir src/unmask/assets/suite --docs 0 --sft 0

writes ``DIR/train.jsonl`` (``{"text": ...}`` per line), ``DIR/sft.jsonl``
(``{"prompt", "response"}``) and the suite (``<task>.jsonl``, default
``DIR/suite/``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import zlib
from dataclasses import dataclass
from typing import Iterable

# ---------------------------------------------------------------------------
# Word lists (fixed order: determinism depends on it)
# ---------------------------------------------------------------------------

FEMALE_NAMES = (
    "Mira Anna Lena Nora Rosa Ella Ida Vera Lucy Ruth Clara Emma Iris Jane Kate "
    "Lily Maya Nina Olga Paula Rita Sara Tina Una Wendy Zoe Alice Beth Cora Dora "
    "Eva Fay Greta Hana Ivy Jill Kira Lara Mona Tess"
).split()
MALE_NAMES = (
    "Tom Sam Ben Max Leo Owen Paul Carl Dan Eli Finn Gus Hugo Ivan Jack Karl Liam "
    "Mark Ned Oscar Pete Ray Seth Ted Vic Walt Zack Adam Bill Cole Dean Earl Fred "
    "Glen Hank Joel Kurt Luke Milo Noel"
).split()
SURNAMES = (
    "Holt Reed Stone Marsh Wood Hale Brook Fisher Parker Turner Cooper Mason Price "
    "Lowe Nash Quinn Shaw Todd Vance Wade York Abbot Bishop Carver Dale Ellis Ford "
    "Grant Hayes Irwin Jensen Keller Lang Moore Noble Olsen Pike Ross Snow Tate "
    "Upton Voss Ward Yates Barr Cobb Dunn Frost Gale Hart Kemp Lyle Moss Nolan Page "
    "Rowe Sloan Thorne Webb Finch"
).split()

VALUES: dict[str, list[str]] = {
    "town": (
        "Oakdale Riverton Millbrook Stonefield Ashford Brightwater Cedarville Dunmore "
        "Elmwood Fairhaven Glenrock Hillcrest Ironbridge Lakeside Maplewood Northbury "
        "Pinecrest Redcliff Sandhill Thornbury Westfield Willowby Greenvale Kingsport "
        "Larkhill Moorfield Oldcastle Pebbleton Quarrytown Rosewood Silverlake Sunnyside "
        "Brackley Coldwater Deepwell Eastwick Foxley Harrowgate Ivydale Juniper"
    ).split(),
    "job": (
        "baker farmer teacher doctor nurse painter builder driver cook singer dancer "
        "writer pilot sailor tailor potter miner guard judge clerk barber butcher "
        "carpenter gardener librarian plumber mechanic poet dentist engineer artist actor"
    ).split(),
    "pet": (
        "dog cat rabbit parrot hamster turtle goat horse pony goldfish lizard owl duck "
        "pig mouse snake"
    ).split(),
    "colour": "red blue green yellow purple orange pink brown black white grey gold".split(),
    "food": (
        "soup bread cheese rice pasta pizza apples pears cake eggs beans carrots honey "
        "plums cherries noodles potatoes pie grapes melon corn"
    ).split(),
    "object": (
        "bicycle boat piano guitar violin drum kite lamp clock camera tent wagon "
        "telescope radio sled canoe ladder hammock umbrella compass lantern trumpet "
        "harp tractor"
    ).split(),
    "age": [str(a) for a in range(18, 80)],
}
ATTRIBUTES = ("town", "job", "pet", "colour", "food", "object", "age")

# World knowledge: every town lies in one region of the land, always the same one. Training text
# states it ("Oakdale is in the north."), and the OBQA-style suite task asks for a person's region,
# which takes two hops: the person's town from the passage, then the town's region (the "open
# book" fact, stated in the item as OpenBookQA's facts are in its book).
REGIONS = ("north", "south", "east", "west")
REGION_OF = {town: REGIONS[i % len(REGIONS)] for i, town in enumerate(VALUES["town"])}

# ---------------------------------------------------------------------------
# Names and the held-out split
# ---------------------------------------------------------------------------


def is_heldout_name(first: str, surname: str) -> bool:
    """True if the full name is reserved for the evaluation suite (see module docstring)."""
    return zlib.crc32(f"{first} {surname}".encode("utf-8")) % 5 == 0


def _name_pool(heldout: bool) -> list[tuple[str, str, str]]:
    pool = []
    for gender, firsts in (("f", FEMALE_NAMES), ("m", MALE_NAMES)):
        for first in firsts:
            for sur in SURNAMES:
                if is_heldout_name(first, sur) == heldout:
                    pool.append((first, sur, gender))
    return pool


TRAIN_NAMES = _name_pool(heldout=False)
SUITE_NAMES = _name_pool(heldout=True)


class Person:
    """A fictional person: name, gender (for pronouns) and one value per attribute."""

    __slots__ = ("first", "surname", "gender", "facts")

    def __init__(self, first: str, surname: str, gender: str, facts: dict[str, str]):
        self.first, self.surname, self.gender, self.facts = first, surname, gender, facts

    @property
    def full(self) -> str:
        return f"{self.first} {self.surname}"

    @property
    def subj(self) -> str:
        return "she" if self.gender == "f" else "he"

    @property
    def poss(self) -> str:
        return "her" if self.gender == "f" else "his"


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _possessive(name: str) -> str:
    return name + "'s"


# ---------------------------------------------------------------------------
# Templates.  Placeholders:
#   {S}/{s}  subject (name, or pronoun capitalised / lower case)
#   {P}/{p}  possessive determiner ("Mira's" / "Her" / "her")
#   {N}      name used in questions (full or first name), {NP} its possessive
#   {v}      the value, {av} value with a/an article
# ---------------------------------------------------------------------------

FACT_TEMPLATES: dict[str, list[str]] = {
    "town": [
        "{S} lives in {v}.",
        "{S} lives in the town of {v}.",
        "{S} has a house in {v}.",
        "{P} home is in {v}.",
        "{S} has lived in {v} for many years.",
    ],
    "job": [
        "{S} works as {av}.",
        "{S} is {av}.",
        "{S} has a job as {av}.",
        "By trade, {s} is {av}.",
        "{P} job is to work as {av}.",
    ],
    "pet": [
        "{S} has a pet {v}.",
        "{S} keeps {av} as a pet.",
        "{P} pet is {av}.",
        "{S} takes care of a pet {v}.",
    ],
    "colour": [
        "{P} favourite colour is {v}.",
        "{S} likes the colour {v} best.",
        "The colour {s} likes most is {v}.",
        "Of all colours, {s} likes {v} the most.",
    ],
    "food": [
        "{P} favourite food is {v}.",
        "{S} likes to eat {v} more than anything.",
        "The food {s} likes best is {v}.",
        "{S} loves to eat {v}.",
    ],
    "object": [
        "{S} owns {av}.",
        "{S} has {av} at home.",
        "{S} bought {av} last year.",
        "{P} most prized thing is {av}.",
    ],
    "age": [
        "{S} is {v} years old.",
        "{P} age is {v}.",
        "{S} turned {v} this year.",
    ],
}

# (question, short answer template, answer sentence template)
# Questions marked HELDOUT are never used in training / SFT.
QUESTIONS: dict[str, list[tuple[str, bool]]] = {
    "town": [
        ("Where does {N} live?", False),
        ("What town does {N} live in?", False),
        ("Where is {NP} home?", False),
        ("In which town does {N} live?", True),
    ],
    "job": [
        ("What is {NP} job?", False),
        ("What does {N} do for work?", False),
        ("What work does {N} do?", False),
        ("Which job does {N} have?", True),
    ],
    "pet": [
        ("What pet does {N} have?", False),
        ("What is {NP} pet?", False),
        ("What kind of pet does {N} keep?", False),
        ("Which animal is {NP} pet?", True),
    ],
    "colour": [
        ("What is {NP} favourite colour?", False),
        ("Which colour does {N} like best?", False),
        ("What colour does {N} like the most?", False),
        ("What colour does {N} love?", True),
    ],
    "food": [
        ("What is {NP} favourite food?", False),
        ("What does {N} like to eat most?", False),
        ("What food does {N} like best?", False),
        ("Which food does {N} love?", True),
    ],
    "object": [
        ("What does {N} own?", False),
        ("What thing does {N} have at home?", False),
        ("What is {NP} most prized thing?", False),
        ("Which thing does {N} own?", True),
    ],
    "age": [
        ("How old is {N}?", False),
        ("What is {NP} age?", False),
        ("What age is {N}?", True),
    ],
}

ANSWER_SENTENCES: dict[str, list[str]] = {
    "town": ["{N} lives in {v}.", "{NP} home is in {v}."],
    "job": ["{N} works as {av}.", "{N} is {av}."],
    "pet": ["{N} has a pet {v}.", "{NP} pet is {av}."],
    "colour": ["{NP} favourite colour is {v}.", "{N} likes {v} best."],
    "food": ["{NP} favourite food is {v}.", "{N} likes to eat {v} most."],
    "object": ["{N} owns {av}.", "{N} has {av} at home."],
    "age": ["{N} is {v} years old.", "{NP} age is {v}."],
}

# BoolQ-style yes/no questions: lower-case first word, no question mark.
YESNO: dict[str, list[tuple[str, bool]]] = {
    "town": [("does {N} live in {v}", False), ("is {NP} home in {v}", False),
             ("is {v} the town where {N} lives", True)],
    "job": [("does {N} work as {av}", False), ("is {N} {av}", False),
            ("is {N} working as {av}", True)],
    "pet": [("does {N} have a pet {v}", False), ("is {NP} pet {av}", False),
            ("does {N} keep {av} as a pet", True)],
    "colour": [("is {NP} favourite colour {v}", False), ("does {N} like the colour {v} best", False),
               ("is {v} the colour {N} likes most", True)],
    "food": [("is {NP} favourite food {v}", False), ("does {N} like to eat {v} most", False),
             ("is {v} the food {N} likes best", True)],
    "object": [("does {N} own {av}", False), ("does {N} have {av} at home", False),
               ("is there {av} in the home of {N}", True)],
    "age": [("is {N} {v} years old", False), ("is the age of {N} {v}", True)],
}

# Cloze (LAMBADA-style) final sentences: the value is the LAST word, with no
# article directly in front of it (an a/an article would leak the answer).
CLOZE: dict[str, list[str]] = {
    "town": ["{N} lives in {v}", "The town where {N} lives is {v}", "Every night, {N} goes home to {v}"],
    "job": ["Every day, {N} goes to work as the local {v}", "In town, everyone knows {N} as the {v}"],
    "pet": ["Each morning, {N} feeds {p} pet {v}", "At home, {N} plays with {p} {v}"],
    "colour": ["{NP} favourite colour is {v}", "The colour that {N} likes best is {v}"],
    "food": ["{NP} favourite food is {v}", "For dinner, {N} likes to eat {v}"],
    "object": ["At home, {N} likes to use {p} {v}", "The thing {N} is most proud of is the {v}"],
    "age": ["The age of {N} is {v}", "This year, {N} turned {v}"],
}

# PIQA-style goals and solutions (how-to questions answered from the passage).
HOWTO: dict[str, tuple[str, str]] = {
    "town": ("How can you visit {N} at home?", "Travel to {v} and knock on the door."),
    "job": ("How can you find {N} at work?", "Ask for the {v} of the town."),
    "pet": ("How can you make {NP} pet happy?", "Bring a treat for the {v}."),
    "colour": ("How can you choose a gift that {N} will love?", "Buy something that is {v}."),
    "food": ("How can you cook a meal that {N} will enjoy?", "Serve {N} some {v}."),
    "object": ("How can you help {N} fix {p} favourite thing?", "Bring tools to fix the {v}."),
    "age": ("How many candles go on the cake for {NP} age?", "Put {v} candles on the cake."),
}

INTROS = [
    "Here are some facts about {k} people.",
    "This is a story about some people.",
    "Read about these neighbours.",
    "These people know each other.",
    "Let me tell you about some friends.",
    "Here is a short text about {k} people.",
    "",
    "",
]
FILLERS = [
    "It was a quiet day.",
    "The wind was cold that morning.",
    "The market was busy.",
    "Everyone in the area knows each other.",
    "The road between the towns is long.",
    "It rained a lot that week.",
    "The sun was warm in the afternoon.",
    "The people there are kind.",
    "Many people walk by the river in the evening.",
    "The summer was long and dry.",
]


REGION_FACTS = ["{t} is in the {r}.", "{t} is a town in the {r}.", "The town of {t} lies in the {r}."]
REGION_STEMS = ["So {N} lives in the", "This means that {N} lives in the", "{NP} home is in the"]


# ---------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------


def _fill(tmpl: str, person: Person, attr: str | None = None, name: str | None = None,
          subj: str | None = None, value: str | None = None) -> str:
    """Fill a template for ``person``.  ``name`` is what {N}/{S} refer to."""
    name = name or person.full
    v = value if value is not None else (person.facts[attr] if attr else "")
    s = subj if subj is not None else name
    poss_s = person.poss if subj in ("she", "he") else _possessive(s)
    out = tmpl.format(
        S=_cap(s), s=s, P=_cap(poss_s), p=person.poss, N=name, NP=_possessive(name),
        v=v, av=_article(v) if v else "",
    )
    return _cap(out)


def _region_fact(rng: random.Random, town: str) -> str:
    return rng.choice(REGION_FACTS).format(t=town, r=REGION_OF[town])


def _region_book(rng: random.Random, people: list[Person]) -> str:
    """The "open book": where each person's town lies, in shuffled order."""
    towns = [x.facts["town"] for x in people]
    rng.shuffle(towns)
    return " ".join(_region_fact(rng, t) for t in towns)


def _region_stem(rng: random.Random, person: Person, name: str) -> str:
    return _fill(rng.choice(REGION_STEMS), person, "town", name=name)


def _pick_name(rng: random.Random, person: Person) -> str:
    return person.full if rng.random() < 0.7 else person.first


def _make_people(rng: random.Random, pool: list[tuple[str, str, str]], k: int) -> list[Person]:
    """k people with distinct first names, surnames and (per attribute) distinct values."""
    chosen: list[tuple[str, str, str]] = []
    firsts, surs = set(), set()
    while len(chosen) < k:
        first, sur, g = pool[rng.randrange(len(pool))]
        if first in firsts or sur in surs:
            continue
        chosen.append((first, sur, g))
        firsts.add(first)
        surs.add(sur)
    values = {a: rng.sample(VALUES[a], k) for a in ATTRIBUTES}
    return [Person(f, s, g, {a: values[a][i] for a in ATTRIBUTES}) for i, (f, s, g) in enumerate(chosen)]


def _describe(rng: random.Random, person: Person, attrs: list[str]) -> list[str]:
    """Fact sentences about one person: full name first, then name / first name / pronoun."""
    out = []
    for i, a in enumerate(attrs):
        tmpl = rng.choice(FACT_TEMPLATES[a])
        if i == 0:
            subj = person.full
        else:
            r = rng.random()
            subj = person.subj if r < 0.4 else (person.first if r < 0.75 else person.full)
        if "{P}" in tmpl or "{p}" in tmpl or "{S}" in tmpl or "{s}" in tmpl:
            out.append(_fill(tmpl, person, a, name=person.full, subj=subj))
        else:
            out.append(_fill(tmpl, person, a))
    return out


def _passage(rng: random.Random, people: list[Person], attrs: list[str],
             fillers: bool = True) -> str:
    sents: list[str] = []
    intro = rng.choice(INTROS).format(k=len(people))
    if len(people) == 1 and " people" in intro:
        intro = "Here is a short text about one person."
    if intro:
        sents.append(intro)
    for person in people:
        order = list(attrs)
        rng.shuffle(order)
        sents.extend(_describe(rng, person, order))
        if fillers and rng.random() < 0.25:
            sents.append(rng.choice(FILLERS))
    return " ".join(sents)


def _question(rng: random.Random, person: Person, attr: str, allow_heldout: bool,
              name: str | None = None) -> str:
    qs = [q for q, held in QUESTIONS[attr] if allow_heldout or not held]
    return _fill(rng.choice(qs), person, attr, name=name or _pick_name(rng, person))


def _yesno(rng: random.Random, person: Person, attr: str, value: str, allow_heldout: bool,
           name: str | None = None) -> str:
    qs = [q for q, held in YESNO[attr] if allow_heldout or not held]
    q = _fill(rng.choice(qs), person, attr, name=name or _pick_name(rng, person), value=value)
    return q[0].lower() + q[1:]


def _answer_sentence(rng: random.Random, person: Person, attr: str, name: str) -> str:
    return _fill(rng.choice(ANSWER_SENTENCES[attr]), person, attr, name=name)


def _cloze(rng: random.Random, person: Person, attr: str, name: str) -> str:
    return _fill(rng.choice(CLOZE[attr]), person, attr, name=name)


def _howto(person: Person, attr: str, name: str, value: str | None = None) -> tuple[str, str]:
    goal, sol = HOWTO[attr]
    return _fill(goal, person, attr, name=name), _fill(sol, person, attr, name=name, value=value)


def _other_value(rng: random.Random, people: list[Person], person: Person, attr: str,
                 p_hard: float = 0.75) -> str:
    """A wrong value: with prob. ``p_hard`` one stated for someone else in the same passage."""
    others = [p.facts[attr] for p in people if p is not person]
    if others and rng.random() < p_hard:
        return rng.choice(others)
    while True:
        v = rng.choice(VALUES[attr])
        if v != person.facts[attr]:
            return v


# ---------------------------------------------------------------------------
# Training documents
# ---------------------------------------------------------------------------


def _story(rng: random.Random, person: Person) -> str:
    """A short narrative consistent with the person's facts (makes generation read like text)."""
    f = person.facts
    n, s, p = person.full, person.subj, person.poss
    first = person.first
    lines = [
        rng.choice([
            f"{n} woke up early in {f['town']}.",
            f"One morning in {f['town']}, {n} woke up before the sun.",
            f"{n} lives in {f['town']} and likes quiet mornings.",
        ]),
        rng.choice([
            f"{_cap(s)} fed {p} {f['pet']} and ate some {f['food']}.",
            f"First {s} gave {p} {f['pet']} some water.",
            f"{first} had {f['food']} for breakfast.",
        ]),
        rng.choice([
            f"Then {s} went to work as the local {f['job']}.",
            f"After that, {first} went to work. {_cap(s)} is {_article(f['job'])}.",
            f"At work, {first} did what every {f['job']} does.",
        ]),
        rng.choice([
            f"In the evening, {s} played with {p} {f['object']}.",
            f"Later, {first} cleaned {p} {f['object']}.",
            f"At home, {s} looked at {p} {f['object']} and smiled.",
        ]),
        rng.choice([
            f"{_cap(s)} wore {_article(f['colour'])} coat, because {f['colour']} is {p} favourite colour.",
            f"{_cap(p)} room is painted {f['colour']}.",
            f"{first} is {f['age']} years old and still loves a good day.",
            "It was a good day.",
        ]),
    ]
    if rng.random() < 0.5:
        lines.append(rng.choice(FILLERS))
    return " ".join(lines)


# Nonce values: any word of the world in any slot ("Ida Ward has a pet lantern."). A document
# whose values are nonce can only be continued by reading it, never from what usually goes in a
# slot, which is the pressure that makes a small model learn to look things up in its context.
# Ages stay numbers.
NONCE_ATTRIBUTES = tuple(a for a in ATTRIBUTES if a != "age")
NONCE_WORDS = sorted({v for a in NONCE_ATTRIBUTES for v in VALUES[a]} | set(FEMALE_NAMES) | set(MALE_NAMES)
                     | set(SURNAMES))


def _give_nonce_values(rng: random.Random, people: list[Person]) -> None:
    words = iter(rng.sample(NONCE_WORDS, len(people) * len(NONCE_ATTRIBUTES)))
    for person in people:
        for a in NONCE_ATTRIBUTES:
            person.facts[a] = next(words)


@dataclass(frozen=True)
class CorpusMix:
    """What the training documents are made of; MIXES names the ones the recipes use.

    story_frac: short stories; people / questions: choices (uniform) of how many people a passage
    describes and how many questions follow it; region_frac: passages followed by where their
    towns lie and each person's region (the OBQA-style two hops); nonce_frac: documents with
    nonce values (NONCE_WORDS). A feature at 0 draws no random number, so "v1" reproduces the
    corpus of the first bundled model byte for byte.
    """

    story_frac: float = 0.12
    people: tuple[int, ...] = (2, 2, 3, 3, 3, 4)
    questions: tuple[int, ...] = (1, 2, 3, 3, 4)
    region_frac: float = 0.0
    nonce_frac: float = 0.0


MIXES = {
    "v1": CorpusMix(),
    # Denser in questions, from one person up, with the region facts and 30 % nonce documents.
    "recall": CorpusMix(story_frac=0.08, people=(1, 2, 2, 3, 3, 4), questions=(2, 3, 3, 4, 4), region_frac=0.12,
                        nonce_frac=0.3),
}


def _doc(rng: random.Random, pool, allow_heldout: bool, mix: CorpusMix = MIXES["v1"]) -> str:
    """One training document; ``allow_heldout`` is False for training/SFT."""
    nonce = mix.nonce_frac > 0 and rng.random() < mix.nonce_frac
    kind = rng.random()
    if kind < mix.story_frac and not nonce:  # short story about one or two people, sometimes with a question
        people = _make_people(rng, pool, rng.choice([1, 1, 2]))
        text = " ".join(_story(rng, p) for p in people)
        if rng.random() < 0.5:
            p = rng.choice(people)
            a = rng.choice(("town", "job", "object"))  # always stated in a story
            name = _pick_name(rng, p)
            text += "\n\nQuestion: " + _question(rng, p, a, allow_heldout, name) + "\nAnswer: " + p.facts[a]
        return text

    k = rng.choice(mix.people)
    n_attrs = rng.choice([2, 3, 3, 4]) if k <= 3 else rng.choice([2, 3])
    people = _make_people(rng, pool, k)
    if nonce:
        _give_nonce_values(rng, people)
    region = mix.region_frac > 0 and not nonce and rng.random() < mix.region_frac
    attrs = rng.sample(ATTRIBUTES, n_attrs)
    if region and "town" not in attrs:
        attrs[0] = "town"
    passage = _passage(rng, people, attrs)
    n_q = rng.choice(mix.questions)
    targets = [(rng.choice(people), rng.choice(attrs)) for _ in range(n_q)]
    if region:  # where the towns lie, then each person's region (OBQA style)
        book = _region_book(rng, people)
        lines = [_region_stem(rng, p, _pick_name(rng, p)) + " " + REGION_OF[p.facts["town"]] + "."
                 for p in dict.fromkeys(p for p, _ in targets)]
        return passage + " " + book + " " + " ".join(lines)
    style = rng.random()
    parts = [passage]
    if style < 0.22:  # ARC-style lines, short answers
        for p, a in targets:
            parts.append("Question: " + _question(rng, p, a, allow_heldout) + "\nAnswer: " + p.facts[a])
        return "\n\n".join(parts) if rng.random() < 0.5 else parts[0] + "\n" + "\n".join(parts[1:])
    if style < 0.34:  # Q/A with sentence answers
        for p, a in targets:
            name = _pick_name(rng, p)
            parts.append("Q: " + _question(rng, p, a, allow_heldout, name) + "\nA: "
                         + _answer_sentence(rng, p, a, name))
        return "\n\n".join(parts)
    if style < 0.46:  # inline questions and answers as prose
        qa = []
        for p, a in targets:
            name = _pick_name(rng, p)
            qa.append(_question(rng, p, a, allow_heldout, name) + " " + _answer_sentence(rng, p, a, name))
        return passage + "\n" + " ".join(qa)
    if style < 0.60:  # BoolQ style (lm-eval prompt: passage\nQuestion: q?\nAnswer: yes/no)
        p, a = targets[0]
        truth = rng.random() < 0.5
        v = p.facts[a] if truth else _other_value(rng, people, p, a)
        return (passage + "\nQuestion: " + _yesno(rng, p, a, v, allow_heldout) + "?\nAnswer: "
                + ("yes" if truth else "no"))
    if style < 0.70:  # ARC style with passage inside the question (as in the suite)
        p, a = targets[0]
        return "Question: " + passage + " " + _question(rng, p, a, allow_heldout) + "\nAnswer: " + p.facts[a]
    if style < 0.80:  # PIQA style how-to
        p, a = targets[0]
        name = _pick_name(rng, p)
        goal, sol = _howto(p, a, name)
        if rng.random() < 0.5:
            return "Question: " + passage + " " + goal + "\nAnswer: " + sol
        return passage + "\n" + goal + " " + sol
    # recall sentences (LAMBADA style): "So, <cloze sentence>."
    recalls = [_cloze(rng, p, a, _pick_name(rng, p)) + "." for p, a in targets]
    rec = " ".join(recalls)
    lead = rng.choice(["", "", "Remember: ", "So, ", "In short: "])
    if lead and not rec.startswith(tuple(x.first for x in people)):
        rec = rec[0].lower() + rec[1:]
    sep = rng.choice([" ", "\n"])
    return passage + sep + lead + rec


def generate_corpus(n_documents: int, seed: int = 0, mix: str | CorpusMix = "v1", shards: int = 1) -> list[str]:
    """Training documents for the bundled model (pretraining-style plain text).

    Only non-held-out names and training question phrasings are used, so the
    evaluation suite stays zero-shot.  Documents are short (typically 20-180
    tokens with the bundled tokenizer) so each fits a 256-token context.
    ``mix``: a CorpusMix or the name of one in MIXES.
    ``shards`` > 1 draws the documents as that many contiguous parts, each from
    its own random stream, generated in parallel processes: the corpus depends
    on (seed, shards), never on the number of cores. (Python generates ~3,000
    documents/s per core, so a GPU recipe's million documents would otherwise
    spend minutes of the device's time here.) shards=1 is the one stream every
    recipe before it used.
    """
    if isinstance(mix, str):
        if mix not in MIXES:
            raise ValueError(f"unknown corpus mix {mix!r}: choose from {', '.join(MIXES)}")
        mix = MIXES[mix]
    if shards < 1:
        raise ValueError(f"shards must be >= 1 (got {shards})")
    if shards == 1:
        return _corpus_part(n_documents, f"train:{seed}", mix)
    sizes = [n_documents // shards + (k < n_documents % shards) for k in range(shards)]
    jobs = [(size, f"train:{seed}:{k}/{shards}", mix) for k, size in enumerate(sizes)]
    with multiprocessing.Pool(min(shards, os.cpu_count() or 1)) as pool:
        return [doc for part in pool.starmap(_corpus_part, jobs) for doc in part]


def _corpus_part(n_documents: int, stream: str, mix: CorpusMix) -> list[str]:
    rng = random.Random(stream)
    return [_doc(rng, TRAIN_NAMES, allow_heldout=False, mix=mix) for _ in range(n_documents)]


SFT_INSTRUCTIONS = [
    "",
    "Read the text and answer the question.\n\n",
    "Answer the question using the text.\n\n",
    "Text:\n",
]


def generate_sft_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chat-style SFT pairs ``{"prompt": passage + question, "response": answer sentence}``.

    The answer can only be found in the passage, so an SFT'd model must read
    its prompt; responses are full sentences ("Mira Holt works as a baker.")
    or "Yes, ..."/"No, ..." for yes/no questions.  Uses training names only.
    """
    rng = random.Random(f"sft:{seed}")
    out = []
    for _ in range(n):
        k = rng.choice([2, 3, 3, 4])
        people = _make_people(rng, TRAIN_NAMES, k)
        attrs = rng.sample(ATTRIBUTES, rng.choice([2, 3, 3]))
        passage = _passage(rng, people, attrs)
        p, a = rng.choice(people), rng.choice(attrs)
        name = _pick_name(rng, p)
        instr = rng.choice(SFT_INSTRUCTIONS)
        kind = rng.random()
        if kind < 0.6:
            q = _question(rng, p, a, False, name)
            resp = _answer_sentence(rng, p, a, name)
        elif kind < 0.85:
            truth = rng.random() < 0.5
            v = p.facts[a] if truth else _other_value(rng, people, p, a)
            q = _cap(_yesno(rng, p, a, v, False, name)) + "?"
            resp = ("Yes. " if truth else "No. ") + _answer_sentence(rng, p, a, name)
        else:
            q, resp = _howto(p, a, name)
        sep = "\n\nQuestion: " if instr else "\n\n"
        out.append({"prompt": instr + passage + sep + q, "response": resp})
    return out


# ---------------------------------------------------------------------------
# Evaluation suite (held-out, public-dataset schemas)
# ---------------------------------------------------------------------------

TASKS = ("world_mc", "world_boolq", "world_cloze", "world_piqa", "world_obqa")


def _suite_passage(rng: random.Random):
    """People + passage where the queried attribute is stated for >= 2 people."""
    k = rng.choice([2, 3, 3, 4])
    people = _make_people(rng, SUITE_NAMES, k)
    attrs = rng.sample(ATTRIBUTES, rng.choice([2, 3]) if k == 4 else rng.choice([2, 3, 3]))
    passage = _passage(rng, people, attrs)
    target = rng.choice(people)
    attr = rng.choice(attrs)
    return people, attrs, passage, target, attr


def _mc_item(rng: random.Random, i: int) -> dict:
    people, attrs, passage, p, a = _suite_passage(rng)
    name = _pick_name(rng, p)
    q = _question(rng, p, a, True, name)
    correct = p.facts[a]
    choices = [x.facts[a] for x in people if x is not p][:3]
    pool = [v for v in VALUES[a] if v != correct and v not in choices]
    choices += rng.sample(pool, 3 - len(choices))
    choices.append(correct)
    rng.shuffle(choices)
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"world_mc/{i:04d}",
        "question": passage + " " + q,
        "choices": {"text": choices, "label": labels},
        "answerKey": labels[choices.index(correct)],
        "meta": {"person": p.full, "attribute": a, "answer": correct, "passage_chars": len(passage)},
    }


def _boolq_item(rng: random.Random, i: int, truth: bool) -> dict:
    people, attrs, passage, p, a = _suite_passage(rng)
    # hard negatives only: the wrong value is always stated in the passage (for
    # someone else), so "is the value mentioned at all?" scores exactly chance.
    v = p.facts[a] if truth else _other_value(rng, people, p, a, p_hard=1.0)
    name = _pick_name(rng, p)
    return {
        "idx": i,
        "question": _yesno(rng, p, a, v, True, name),
        "passage": passage,
        "answer": truth,
        "meta": {"person": p.full, "attribute": a, "asked_value": v, "true_value": p.facts[a]},
    }


def _cloze_item(rng: random.Random, i: int) -> dict:
    people, attrs, passage, p, a = _suite_passage(rng)
    final = _cloze(rng, p, a, _pick_name(rng, p))
    return {
        "idx": i,
        "text": passage + " " + final,
        "meta": {"person": p.full, "attribute": a, "target": p.facts[a], "passage_chars": len(passage)},
    }


def _piqa_item(rng: random.Random, i: int) -> dict:
    people, attrs, passage, p, a = _suite_passage(rng)
    name = _pick_name(rng, p)
    wrong = _other_value(rng, people, p, a, p_hard=1.0)  # hard negative, see _boolq_item
    goal, good = _howto(p, a, name)
    _, bad = _howto(p, a, name, value=wrong)
    label = rng.randrange(2)
    sols = [bad, bad]
    sols[label] = good
    return {
        "idx": i,
        "goal": passage + " " + goal,
        "sol1": sols[0],
        "sol2": sols[1],
        "label": label,
        "meta": {"person": p.full, "attribute": a, "answer": p.facts[a], "distractor": wrong,
                 "passage_chars": len(passage)},
    }


def _obqa_item(rng: random.Random, i: int) -> dict:
    """OpenBookQA schema: the passage, the book facts (each passage town's region), an open stem."""
    k = rng.choice([2, 3, 3])
    people = _make_people(rng, SUITE_NAMES, k)
    attrs = ["town"] + rng.sample([a for a in ATTRIBUTES if a != "town"], rng.choice([1, 2]))
    passage = _passage(rng, people, attrs)
    book = _region_book(rng, people)
    p = rng.choice(people)
    stem = _region_stem(rng, p, _pick_name(rng, p))
    labels = ["A", "B", "C", "D"]
    correct = REGION_OF[p.facts["town"]]
    return {
        "id": f"world_obqa/{i:04d}",
        "question_stem": passage + " " + book + " " + stem,
        "choices": {"text": list(REGIONS), "label": labels},
        "answerKey": labels[REGIONS.index(correct)],
        "meta": {"person": p.full, "town": p.facts["town"], "answer": correct, "passage_chars": len(passage)},
    }


def generate_suite(seed: int = 1234, n_items: int = 250) -> dict[str, list[dict]]:
    """The held-out zero-shot evaluation suite, one list of items per task.

    Items follow public dataset schemas so the generic zero-shot evaluator can
    score them with lm-eval's prompt formats:

    * ``world_mc``    -- ARC (``question`` includes the passage; 4 choices of the
      same category, distractors taken from other people in the passage).
    * ``world_boolq`` -- BoolQ (``question``, ``passage``, ``answer``), exactly balanced.
    * ``world_cloze`` -- LAMBADA (``text``; target = last word, a fact from the passage).
    * ``world_piqa``  -- PIQA (``goal`` includes the passage; ``sol1``/``sol2``; ``label``).
    * ``world_obqa``  -- OpenBookQA (``question_stem``: passage, the region of each town in it,
      then an open statement about one person's region; the 4 regions are the choices).

    BoolQ negatives and PIQA wrong solutions always use a value stated in the
    passage for another person, so "was this value mentioned?" is at chance;
    MC distractors are first the other people's values, then random values
    of the same category.

    Every item also carries a ``meta`` dict (person, attribute, answer) for
    analysis; evaluators ignore it.  Only held-out names are used.
    """
    rng = random.Random(f"suite:{seed}")
    truths = [True] * (n_items // 2) + [False] * (n_items - n_items // 2)
    rng.shuffle(truths)
    suite = {
        "world_mc": [_mc_item(rng, i) for i in range(n_items)],
        "world_boolq": [_boolq_item(rng, i, truths[i]) for i in range(n_items)],
        "world_cloze": [_cloze_item(rng, i) for i in range(n_items)],
        "world_piqa": [_piqa_item(rng, i) for i in range(n_items)],
    }
    obqa_rng = random.Random(f"suite-obqa:{seed}")  # its own stream: the older tasks stay byte-identical
    suite["world_obqa"] = [_obqa_item(obqa_rng, i) for i in range(n_items)]
    return suite


def suite_passages(suite: dict[str, list[dict]]) -> list[str]:
    """The passage text of every suite item (for leak checks against training data)."""
    out = [it["passage"] for it in suite["world_boolq"]]
    for task, key in (("world_mc", "question"), ("world_cloze", "text"), ("world_piqa", "goal"),
                      ("world_obqa", "question_stem")):
        out += [it[key][: it["meta"]["passage_chars"]] for it in suite[task]]
    return out


def suite_names(suite: dict[str, list[dict]]) -> set[str]:
    """Full names of all people mentioned in suite items (target people)."""
    return {it["meta"]["person"] for items in suite.values() for it in items}


# ---------------------------------------------------------------------------
# IO / CLI
# ---------------------------------------------------------------------------


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines (UTF-8, stable key order); returns the row count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_suite(suite_dir: str, seed: int = 1234, n_items: int = 250) -> dict[str, int]:
    """Generate the suite and write ``<task>.jsonl`` files into ``suite_dir``."""
    os.makedirs(suite_dir, exist_ok=True)
    suite = generate_suite(seed, n_items)
    return {t: write_jsonl(os.path.join(suite_dir, f"{t}.jsonl"), items) for t, items in suite.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m unmask.data.world", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for train.jsonl / sft.jsonl (and suite/)")
    ap.add_argument("--docs", type=int, default=40000, help="number of training documents")
    ap.add_argument("--sft", type=int, default=20000, help="number of SFT pairs")
    ap.add_argument("--seed", type=int, default=0, help="training / SFT seed")
    ap.add_argument("--mix", default="v1", choices=sorted(MIXES), help="what the documents are made of (CorpusMix)")
    ap.add_argument("--shards", type=int, default=1,
                    help="draw the documents as this many random streams, in parallel processes (default 1: "
                         "the single stream of the shipped recipes)")
    ap.add_argument("--suite-seed", type=int, default=1234)
    ap.add_argument("--suite-items", type=int, default=250)
    ap.add_argument("--suite-dir", default=None, help="where to write the suite (default OUT/suite)")
    ap.add_argument("--no-suite", action="store_true")
    args = ap.parse_args(argv)
    if args.out is None and (args.docs or args.sft or args.suite_dir is None):
        ap.error("--out is required unless --docs 0 --sft 0 --suite-dir DIR")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    if args.docs:
        n = write_jsonl(os.path.join(args.out, "train.jsonl"),
                        ({"text": t} for t in generate_corpus(args.docs, args.seed, args.mix, args.shards)))
        print(f"wrote {n} documents to {os.path.join(args.out, 'train.jsonl')}")
    if args.sft:
        n = write_jsonl(os.path.join(args.out, "sft.jsonl"), generate_sft_pairs(args.sft, args.seed))
        print(f"wrote {n} SFT pairs to {os.path.join(args.out, 'sft.jsonl')}")
    if not args.no_suite:
        d = args.suite_dir or os.path.join(args.out, "suite")
        counts = write_suite(d, args.suite_seed, args.suite_items)
        print(f"wrote suite to {d}: {counts}")


if __name__ == "__main__":
    main()
