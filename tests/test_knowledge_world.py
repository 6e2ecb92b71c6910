"""World v2 (unmask.data.knowledge): the population file, the corpus's held-out contract, the suite."""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from unmask.data import knowledge as K
from unmask.data.world import REGION_OF
from unmask.eval import DEFAULT_TASKS, get_task, load_items
from unmask.eval.tasks import SUITE_DIR

POPULATION = K.load_population()
SPLIT = {p["name"]: p["split"] for p in POPULATION}
FULL_NAME_RE = re.compile(r"\b(" + "|".join(re.escape(n) for n in SPLIT) + r")\b")
# Every phrasing the suite asks in; none may occur in training text.
SUITE_PHRASES = [
    r"In which town does", r"Which job does", r"Which animal is", r"What colour does [\w' ]+ love",
    r"Which food does", r"Which thing does",
    r"\bis \w+ the town where", r"working as an? ", r"does [\w ]+ keep an? \w+ as a pet",
    r"\bis \w+ the colour", r"\bis \w+ the food", r"is there an? \w+ in the home of",
    r"This means that", r"The region where", r"feeds (his|her) pet some",
] + [re.escape(goal.split("{")[0]) for _, goal, _ in K.HOWTO.values()]
QA_MARKERS = re.compile(r"Question:|Answer:|\bSo \w|The pet of|'s home is in the (north|south|east|west)")


@pytest.fixture(scope="module", params=[0.0, 0.5], ids=["first-phase", "open-book"])
def corpus(request):
    """The corpus of each training phase: the held-out contract holds for both."""
    return K.generate_corpus(6000, seed=0, shards=1, mix=K.KnowledgeMix(open_book=request.param))


@pytest.fixture(scope="module")
def suite():
    return K.generate_suite()


def test_population_file_is_what_the_generator_writes():
    assert POPULATION == json.loads(json.dumps(K.make_population()))
    assert len(POPULATION) == K.N_PEOPLE == len(SPLIT)
    assert Counter(SPLIT.values()) == {"qa": 200, "heldout": 200}
    for p in POPULATION:
        assert set(p["facts"]) == set(K.ATTRIBUTES) and p["split"] in ("qa", "heldout")


def test_values_and_mentions_are_skewed_like_language():
    """Dogs far more common than owls; the most-mentioned person ~10x the least: CFG's prior term
    differs between choices only if the world's priors do."""
    pets = K.value_frequencies(POPULATION)["pet"]
    assert pets.most_common(1)[0][0] == "dog" and pets["dog"] > 5 * max(pets["owl"], 1)
    mentions = [p["mentions"] for p in POPULATION]
    assert mentions == sorted(mentions, reverse=True) and mentions[0] > 8 * mentions[-1]
    # both splits span the ranking
    assert [p["split"] for p in POPULATION[:4]] == ["qa", "heldout", "qa", "heldout"]


def test_corpus_is_deterministic():
    assert K.generate_corpus(300, seed=3, shards=1) == K.generate_corpus(300, seed=3, shards=1)
    assert K.generate_corpus(300, seed=3, shards=1) != K.generate_corpus(300, seed=4, shards=1)


def test_open_book_documents_need_the_memorised_fact_unless_they_state_it():
    """An open book of four facts, the person's town or pet among them, then the conclusion; the
    person's own fact comes first only in the `stated` fraction of documents."""
    world = K.World.load()
    rng = random.Random(0)
    for stated in (0.0, 1.0):
        for _ in range(40):
            p = world.draw(rng, 1, world.qa)[0]
            doc = K.open_book_document(rng, p, stated)
            region = "lives in the" in doc or "home is in the" in doc
            fact, answer = (p.facts["town"], K.REGION_OF[p.facts["town"]]) if region else \
                           (p.facts["pet"], K.DIET[p.facts["pet"]])
            sentences = doc.split(". ")
            mentions_person = [x for x in sentences[:-1] if p.first in x]
            assert doc.endswith(f" {answer}.") and fact in doc and p.first in doc.split(". ")[-1]
            assert bool(mentions_person) == (stated == 1.0), doc   # the stated fact names the person
    mix = K.KnowledgeMix(open_book=0.5)
    docs = [K.document(rng, world, mix) for _ in range(2000)]
    share = sum(d.endswith(tuple(f" {v}." for v in set(K.REGION_OF.values()) | set(K.DIET.values())))
                and ("So " in d or "pet eats" in d or "home is in the" in d or "The pet of" in d) for d in docs) / 2000
    assert 0.45 < share < 0.6   # half open-book documents, plus the mix's own few two-hop ones
    assert K.generate_corpus(50, seed=1, shards=1) == K.generate_corpus(50, seed=1, shards=1, mix=K.KnowledgeMix())


def test_no_question_or_answer_text_about_a_heldout_person(corpus):
    qa_docs = [d for d in corpus if QA_MARKERS.search(d)]
    assert len(qa_docs) > 0.15 * len(corpus)
    for doc in qa_docs:
        names = FULL_NAME_RE.findall(doc)
        assert all(SPLIT[n] == "qa" for n in names), doc
    # heldout people are in the corpus all the same: their biographies and stories
    mentioned = Counter(n for d in corpus for n in FULL_NAME_RE.findall(d))
    heldout = [n for n, s in SPLIT.items() if s == "heldout"]
    assert sum(mentioned[n] > 0 for n in heldout) > 150


def test_suite_phrasings_never_occur_in_training(corpus):
    text = "\n".join(corpus)
    for phrase in SUITE_PHRASES:
        assert not re.search(phrase, text), phrase


def test_suite_asks_only_about_heldout_people(suite):
    for task, items in suite.items():
        for it in items:
            people = it["meta"].get("people") or [it["meta"]["person"]]
            assert all(SPLIT[n] == "heldout" for n in people), (task, it)


@pytest.fixture(scope="module")
def control():
    return K.generate_suite(control=True)


def test_control_suite_asks_qa_people_in_training_phrasings(control):
    """The control suite: qa people only, in phrasings (and answer strings) the corpus uses."""
    for task, items in control.items():
        for it in items:
            people = it["meta"].get("people") or [it["meta"]["person"]]
            assert all(SPLIT[n] == "qa" for n in people), (task, it)
            text = json.dumps(it)
            assert not any(re.search(phrase, text) for phrase in SUITE_PHRASES), (task, it)
    people = {p.full: p for p in K.World.load().qa}
    for it in control["know_arc"]:  # each question is one of the corpus's own question templates
        p, a = people[it["meta"]["person"]], it["meta"]["attribute"]
        training = [K._fill(q, p, a, name=p.full) for q, held in K.QUESTIONS[a] if not held]
        assert it["question"] in training, it["question"]
    assert_right_answers(control)


def test_suite_items_have_the_right_answers(suite):
    assert_right_answers(suite)


def assert_right_answers(suite):
    facts = {p["name"]: p["facts"] for p in POPULATION}
    for it in suite["know_arc"]:
        f = facts[it["meta"]["person"]]
        choices = it["choices"]["text"]
        assert len(set(choices)) == 4 and choices["ABCD".index(it["answerKey"])] == f[it["meta"]["attribute"]]
    assert Counter(it["answer"] for it in suite["know_boolq"]) == {True: 156, False: 156}
    for it in suite["know_boolq"]:
        assert (it["meta"]["asked_value"] == facts[it["meta"]["person"]][it["meta"]["attribute"]]) == it["answer"]
    for it in suite["know_obqa"]:
        f = facts[it["meta"]["person"]]
        want = REGION_OF[f["town"]] if it["meta"]["kind"] == "region" else K.DIET[f["pet"]]
        assert it["choices"]["text"]["ABCD".index(it["answerKey"])] == want
        assert len(set(it["choices"]["text"])) == 4
    for it in suite["know_lambada"]:
        *context, last = it["text"].split(" ")
        assert last == it["meta"]["target"] and last in " ".join(context)
    for it in suite["know_piqa"]:
        right = [it["sol1"], it["sol2"]][it["label"]]
        assert it["meta"]["answer"] in right and it["meta"]["distractor"] not in right


def test_distractors_follow_the_worlds_frequencies(suite):
    """Common values are drawn as distractors far more often than rare ones."""
    drawn = Counter(c for it in suite["know_arc"] if it["meta"]["attribute"] == "pet"
                    for c in it["choices"]["text"] if c != it["meta"]["answer"])
    assert drawn["dog"] > 3 * max(drawn["snake"], 1)


def test_balanced_answers_ask_every_value_about_equally_often(suite):
    """The shipped suite's ARC- and PIQA-like answers spread over the values (each value asked
    about equally often), where the first suite's followed the world's Zipf-like frequencies: the
    prior is then wrong on average, as on real benchmarks, and CFG has something to correct."""
    def answers(s, attr):
        return Counter(it["meta"]["answer"] for task in ("know_arc", "know_piqa") for it in s[task]
                       if it["meta"]["attribute"] == attr)
    corpus = K.generate_suite(balanced=False)
    held = K.value_frequencies([p for p in POPULATION if p["split"] == "heldout"])
    for attr in K.ATTRIBUTES:
        common = held[attr].most_common(1)[0][0]
        share = {name: s[common] / sum(s.values()) for name, s in (("balanced", answers(suite, attr)),
                                                                     ("corpus", answers(corpus, attr)))}
        assert share["balanced"] < 0.5 * share["corpus"], (attr, share)
        assert share["balanced"] < 2.5 / len(held[attr])   # about 1 / (values held), with sampling noise
    assert Counter(it["meta"]["attribute"] for it in suite["know_arc"]).most_common()[-1][1] > 30


def test_shipped_suite_is_what_the_generator_writes(suite):
    for task in K.TASKS:
        rows = [json.loads(line) for line in (SUITE_DIR / f"{task}.jsonl").read_text().splitlines()]
        assert rows == suite[task], task


def test_default_eval_tasks_read_the_shipped_suite():
    assert DEFAULT_TASKS == list(K.TASKS)
    for name in DEFAULT_TASKS:
        items = load_items(get_task(name))
        assert len(items) == K.SUITE_ITEMS
        assert items[0].requests[0][1].startswith(" ")


def test_sft_pairs_keep_the_held_out_contract():
    """SFT pairs ask only about qa people, in training phrasings, and answer correctly."""
    pairs = K.generate_sft_pairs(600, seed=0)
    assert pairs == K.generate_sft_pairs(600, seed=0) != K.generate_sft_pairs(600, seed=1)
    facts = {p["name"]: p["facts"] for p in POPULATION}
    for pair in pairs:
        text = pair["prompt"] + pair["response"]
        assert not any(re.search(phrase, text) for phrase in SUITE_PHRASES), text
        names = FULL_NAME_RE.findall(pair["prompt"])
        assert len(set(names)) == 1 and SPLIT[names[0]] == "qa", pair
        assert pair["prompt"].endswith("\nAnswer:") and pair["response"].startswith(" ")
        answer = pair["response"].strip()
        if answer in ("yes", "no"):  # a yes/no question names the asked value; it is the fact iff "yes"
            asked = [v for v in facts[names[0]].values() if re.search(rf"\b{re.escape(v)}\b", pair["prompt"])]
            assert (answer == "yes") == bool(asked), pair
        elif "one word" in pair["prompt"]:
            assert answer in facts[names[0]].values(), pair
        else:
            assert any(v in answer for v in facts[names[0]].values()), pair


def test_sft_pairs_cli_writes_pairs_and_keeps_the_population(tmp_path):
    before = K.POPULATION_PATH.read_bytes()
    K.main(["--out", str(tmp_path), "--docs", "0", "--sft", "5", "--no-suite"])
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert rows == K.generate_sft_pairs(5, seed=0)
    assert K.POPULATION_PATH.read_bytes() == before


def test_skill_probe_corpus_is_dense_in_yes_no_and_two_hop_text_about_qa_people_only():
    """scripts/skill_probe.py: the corpus of the verification/two-hop probe keeps the held-out
    contract while a third of its documents end in yes/no questions."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import skill_probe
    rng, world = random.Random("probe:0"), K.World.load()
    docs = [skill_probe.probe_document(rng, world) for _ in range(1500)]
    yes_no = [d for d in docs if re.search(r"\nAnswer: (yes|no)$", d)]
    assert 0.3 < len(yes_no) / len(docs) < 0.5
    two_hop = re.compile(r"\bSo \w|The pet of|'s home is in the (north|south|east|west)")
    assert sum(bool(two_hop.search(d)) for d in docs) > 0.17 * len(docs)
    for doc in docs:
        if QA_MARKERS.search(doc):
            assert all(SPLIT[n] == "qa" for n in FULL_NAME_RE.findall(doc)), doc
    text = "\n".join(docs)
    for phrase in SUITE_PHRASES:
        assert not re.search(phrase, text), phrase


def _asked(doc: str, person: K.Person) -> tuple[str, str, bool, str, str]:
    """(attribute, asked value, whether the answer is right, passage, question) of a verification document."""
    passage, question, answer = re.fullmatch(r"(.*)\nQuestion: (.*)\?\nAnswer: (yes|no)", doc, re.S).groups()
    asked = [(a, v) for a in K.ATTRIBUTES for v in K.VALUES[a] if re.search(rf"\b{v}\b", question)]
    assert len(asked) == 1, question
    a, v = asked[0]
    return a, v, (answer == "yes") == (v == person.facts[a]), passage, question


def test_yes_no_documents_state_the_asked_fact_only_when_asked_to():
    """`yes_no_document`: the answer says whether the asked value is the person's; the
    passage states the asked fact exactly when `stated`; suite phrasings only when `suite`; and a
    `--stated 1` corpus is nothing but such items about qa people in the corpus's phrasings."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import skill_probe
    rng, world = random.Random("verify:test"), K.World.load()
    phrases = re.compile("|".join(SUITE_PHRASES))
    answers = Counter()
    for i in range(400):
        suite, stated = bool(i % 2), bool(i // 2 % 2)
        person = rng.choice(world.heldout if suite else world.qa)
        doc = K.yes_no_document(rng, world, person, suite, stated)
        a, v, right, passage, question = _asked(doc, person)
        assert right, doc
        assert (re.search(rf"\b{person.facts[a]}\b", passage) is not None) == stated, doc
        assert bool(phrases.search(question)) == suite, doc
        answers[doc.endswith("yes")] += 1
    assert min(answers.values()) > 150
    corpus_rng = random.Random("probe:0")
    for _ in range(200):
        doc = skill_probe.probe_document(corpus_rng, world, stated=1.0)
        names = FULL_NAME_RE.findall(doc)
        assert names and all(SPLIT[n] == "qa" for n in names), doc
        person = next(p for p in world.qa if p.full == names[0])
        a, v, right, passage, _ = _asked(doc, person)
        assert right and re.search(rf"\b{person.facts[a]}\b", passage) and not phrases.search(doc), doc


def test_reasoned_yes_no_documents_write_the_fact_then_the_verdict():
    """`yes_no_document(reasoned=True)`: the same passage and question as the plain item drawn from
    the same state, the answer the person's true fact, then the plain item's verdict; a
    `--reasoned 1` corpus is only such items about qa people in the corpus's phrasings."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import skill_probe
    world = K.World.load()
    for i in range(200):
        person = world.everyone[i % len(world.everyone)]
        plain = K.yes_no_document(random.Random(i), world, person, bool(i % 2))
        reasoned = K.yes_no_document(random.Random(i), world, person, bool(i % 2), reasoned=True)
        head, verdict = plain.rsplit(" ", 1)
        fact, said = re.fullmatch(re.escape(head) + r" (.*), so (yes|no)\.", reasoned).groups()
        a, *_ = _asked(plain, person)
        assert said == verdict and re.search(rf"\b{person.facts[a]}\b", fact) and person.full in fact, reasoned
    rng, phrases = random.Random("probe:0"), re.compile("|".join(SUITE_PHRASES))
    for _ in range(100):
        doc = skill_probe.probe_document(rng, world, reasoned=1.0)
        names = FULL_NAME_RE.findall(doc)
        assert skill_probe.REASONED.match(doc) and all(SPLIT[n] == "qa" for n in names), doc
        assert not phrases.search(doc), doc


def test_skill_probe_reads_the_written_fact_and_scores_the_verdict_after_the_true_one(monkeypatch):
    """`reasoned_answers`: a fact is written right when the first line the model writes, before
    ", so", names the person's value; the verdict is scored after the document's own fact, " yes"
    against " no", and is right when it is the document's."""
    from types import SimpleNamespace

    import unmask
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import skill_probe
    tokenizer = unmask.load()[1]
    doc_no = "Ada Moss is a baker.\nQuestion: does Ada Moss keep a dog?\nAnswer: Ada Moss has a pet cat, so no."
    doc_yes = "Ada Moss is a baker.\nQuestion: does Ada Moss keep a cat?\nAnswer: Ada Moss has a pet cat, so yes."
    written = {doc_no: " Ada Moss has a pet dog, so yes.\nQuestion: what is Ada Moss's pet? cat",   # wrong fact
               doc_yes: " Ada Moss has a pet cat, so no."}                                        # right fact
    monkeypatch.setattr(skill_probe, "generate_text",
                        lambda model, tok, prompts, **kw: [written[d] for p in prompts for d in written if d.startswith(p)])
    contexts = []

    def always_yes(model, context, choice):   # the "model" says yes whatever the facts
        contexts.append(tokenizer.decode(context))
        return SimpleNamespace(value=float(choice == tokenizer(" yes").input_ids))
    monkeypatch.setattr(skill_probe, "exact_bound", always_yes)
    assert skill_probe.reasoned_answers(None, tokenizer, [doc_no, doc_yes, "no answer here"]) == (2, 1, 1)
    assert set(contexts) == {doc_no[:-len(" no.")], doc_yes[:-len(" yes.")]}


def test_skill_probe_verification_table_scores_each_cell_by_trained_yes_no(monkeypatch):
    """`verification_table`: four cells, each `trained_yes_no` over n items of its kind."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import skill_probe
    seen = []

    def fake_scores(model, tokenizer, docs):
        seen.append(docs)
        return len(docs), len(seen), 1
    monkeypatch.setattr(skill_probe, "trained_yes_no", fake_scores)
    table = skill_probe.verification_table(None, None, 8).splitlines()
    assert [len(d) for d in seen] == [8] * 4
    assert table[2] == "| held-out (suite) | 12.5 % (yes 1) | 25.0 % (yes 1) |"
    assert table[3] == "| qa (corpus) | 37.5 % (yes 1) | 50.0 % (yes 1) |"
    world = K.World.load()
    for cell, docs in enumerate(seen):
        for doc in docs:
            names = FULL_NAME_RE.findall(doc)
            assert SPLIT[names[0]] == ("heldout" if cell < 2 else "qa")
            person = next(p for p in world.everyone if p.full == names[0])
            a, _, right, passage, _ = _asked(doc, person)
            assert right and (re.search(rf"\b{person.facts[a]}\b", passage) is not None) == (cell % 2 == 1)


def test_skill_probe_scores_yes_no_documents_as_the_model_predicts_the_answer():
    """`trained_yes_no` against a plain computation: the model's logits at the masked answer after
    the document's context, " yes" against " no"; documents without a yes/no ending are skipped."""
    import torch

    import unmask
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import skill_probe
    model, tokenizer = unmask.load()
    rng, world = random.Random("probe:1"), K.World.load()
    docs = [skill_probe.yesno_document(rng, world, world.draw(rng, 1, world.qa)[0]) for _ in range(12)]
    docs += ["Hugo Ross keeps a rabbit."]
    scored, right, said_yes = skill_probe.trained_yes_no(model, tokenizer, docs)
    yes, no = tokenizer(" yes").input_ids[-1], tokenizer(" no").input_ids[-1]
    expected_right = expected_yes = 0
    for doc in docs[:-1]:
        context, answer = doc.rsplit(" ", 1)
        ids = tokenizer(context).input_ids + [model.config.mask_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        says_yes = bool(logits[yes] > logits[no])
        expected_yes += says_yes
        expected_right += says_yes == (answer == "yes")
    assert (scored, right, said_yes) == (12, expected_right, expected_yes)
