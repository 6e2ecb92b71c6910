"""Tests for the synthetic world corpus, its held-out eval suite and the tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unmask.data import world as W
from unmask.data.tokenizer import (
    EOS_TOKEN,
    MASK_TOKEN,
    special_token_ids,
    train_tokenizer,
)

SUITE_DIR = Path(W.__file__).resolve().parent.parent / "assets" / "suite"
FULL_NAME_RE = re.compile(
    r"\b(" + "|".join(W.FEMALE_NAMES + W.MALE_NAMES) + r") (" + "|".join(W.SURNAMES) + r")\b"
)
HELDOUT_PHRASES = [
    r"In which town does", r"Which job does", r"Which animal is", r"What colour does [\w' ]+ love",
    r"Which food does", r"Which thing does", r"What age is",
    r"\bis \w+ the town where", r"working as an? ", r"does [\w ]+ keep an? \w+ as a pet",
    r"\bis \w+ the colour", r"\bis \w+ the food", r"is there an? \w+ in the home of", r"is the age of",
]


@pytest.fixture(scope="module")
def corpus():
    return W.generate_corpus(2000, seed=0) + W.generate_corpus(2000, seed=0, mix="recall")


@pytest.fixture(scope="module")
def suite():
    return W.generate_suite(seed=1234, n_items=250)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus[:800], vocab_size=600)


# -- determinism -------------------------------------------------------------


def test_determinism():
    assert W.generate_corpus(50, 3) == W.generate_corpus(50, 3)
    assert W.generate_corpus(50, 3) != W.generate_corpus(50, 4)
    assert W.generate_sft_pairs(20, 1) == W.generate_sft_pairs(20, 1)
    assert W.generate_suite(7, 20) == W.generate_suite(7, 20)
    assert W.generate_suite(7, 20) != W.generate_suite(8, 20)


def test_shipped_suite_matches_generator(suite):
    """The JSONL files in assets/suite are exactly what the documented command writes."""
    for task in W.TASKS:
        path = SUITE_DIR / f"{task}.jsonl"
        assert path.exists(), path
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows == suite[task]
    assert sum(p.stat().st_size for p in SUITE_DIR.glob("*")) < 2_000_000


# -- held-out property -------------------------------------------------------


def test_name_split_is_partition():
    train = {(f, s) for f, s, _ in W.TRAIN_NAMES}
    held = {(f, s) for f, s, _ in W.SUITE_NAMES}
    assert not train & held
    assert len(train) + len(held) == len(W.FEMALE_NAMES + W.MALE_NAMES) * len(W.SURNAMES)
    # every first name and surname still occurs in training
    assert {f for f, _ in train} == set(W.FEMALE_NAMES + W.MALE_NAMES)
    assert {s for _, s in train} == set(W.SURNAMES)


def test_no_suite_leak_into_training(corpus, suite):
    sft = W.generate_sft_pairs(1000, seed=0)
    train_texts = corpus + [p["prompt"] + " " + p["response"] for p in sft]
    blob = "\n".join(train_texts)
    train_names = {m.group(0) for m in FULL_NAME_RE.finditer(blob)}
    assert train_names, "regex should find names"
    assert all(not W.is_heldout_name(*n.split()) for n in train_names)
    suite_names = W.suite_names(suite)
    for task, items in suite.items():
        for it in items:
            text = json.dumps(it)
            suite_names |= {m.group(0) for m in FULL_NAME_RE.finditer(text)}
    assert all(W.is_heldout_name(*n.split()) for n in suite_names)
    assert not train_names & suite_names
    for passage in W.suite_passages(suite):
        assert len(passage) > 50
        # a distinctive sentence-level chunk of the passage never appears in training
        assert passage not in blob


def test_heldout_question_phrasings_not_in_training(corpus, suite):
    blob = "\n".join(corpus + [p["prompt"] for p in W.generate_sft_pairs(1000, seed=0)])
    for pat in HELDOUT_PHRASES:
        assert not re.search(pat, blob), pat
    qs = "\n".join(it["question"] for it in suite["world_mc"] + suite["world_boolq"])
    assert sum(bool(re.search(p, qs)) for p in HELDOUT_PHRASES) >= 5


# -- schemas & correctness ---------------------------------------------------


def test_suite_sizes(suite):
    assert set(suite) == set(W.TASKS)
    for items in suite.values():
        assert len(items) == 250


def test_mc_schema_and_answers(suite):
    for it in suite["world_mc"]:
        assert set(it) >= {"id", "question", "choices", "answerKey"}
        assert it["choices"]["label"] == ["A", "B", "C", "D"]
        texts = it["choices"]["text"]
        assert len(texts) == 4 and len(set(texts)) == 4
        ans = texts[it["choices"]["label"].index(it["answerKey"])]
        assert ans == it["meta"]["answer"]
        passage = it["question"][: it["meta"]["passage_chars"]]
        assert re.search(rf"\b{re.escape(ans)}\b", passage)
        # at least one distractor is also stated in the passage (priors can't answer)
        assert any(re.search(rf"\b{re.escape(t)}\b", passage) for t in texts if t != ans)
        assert it["question"].endswith("?")
    keys = [it["answerKey"] for it in suite["world_mc"]]
    assert all(keys.count(k) > 30 for k in "ABCD")


def _person_value_stated(passage: str, person: str, value: str) -> bool:
    """The value appears in the block of sentences about ``person`` (grouped per person)."""
    start = passage.index(person)
    others = [m.start() for m in FULL_NAME_RE.finditer(passage) if m.start() > start
              and m.group(0) != person]
    end = min(others) if others else len(passage)
    return re.search(rf"\b{re.escape(value)}\b", passage[start:end]) is not None


def test_boolq_schema_and_labels(suite):
    items = suite["world_boolq"]
    assert sum(it["answer"] for it in items) == 125
    for it in items:
        assert set(it) >= {"question", "passage", "answer"}
        assert isinstance(it["answer"], bool)
        q = it["question"]
        assert q[0].islower() and not q.endswith("?")
        m = it["meta"]
        assert m["asked_value"] in q
        assert (m["asked_value"] == m["true_value"]) == it["answer"]
        assert _person_value_stated(it["passage"], m["person"], m["true_value"])
        if not it["answer"]:
            assert not _person_value_stated(it["passage"], m["person"], m["asked_value"])
            assert re.search(rf"\b{re.escape(m['asked_value'])}\b", it["passage"])  # hard negative


def test_cloze_schema(suite):
    for it in suite["world_cloze"]:
        text = it["text"]
        context, target = text.rsplit(" ", 1)
        assert target == it["meta"]["target"] and re.fullmatch(r"\w+", target)
        passage = text[: it["meta"]["passage_chars"]]
        assert _person_value_stated(passage, it["meta"]["person"], target)
        assert not context.endswith((" a", " an"))


def test_piqa_schema(suite):
    labels = []
    for it in suite["world_piqa"]:
        assert set(it) >= {"goal", "sol1", "sol2", "label"}
        assert it["label"] in (0, 1)
        labels.append(it["label"])
        good = (it["sol1"], it["sol2"])[it["label"]]
        bad = (it["sol1"], it["sol2"])[1 - it["label"]]
        assert good != bad
        assert re.search(rf"\b{re.escape(it['meta']['answer'])}\b", good)
        passage = it["goal"][: it["meta"]["passage_chars"]]
        assert _person_value_stated(passage, it["meta"]["person"], it["meta"]["answer"])
        assert re.search(rf"\b{re.escape(it['meta']['distractor'])}\b", passage)  # hard negative
    assert 80 < sum(labels) < 170


def test_sft_pairs():
    pairs = W.generate_sft_pairs(200, seed=0)
    assert all(set(p) == {"prompt", "response"} for p in pairs)
    assert all(p["response"] and p["prompt"] for p in pairs)


def test_cli_writes_files(tmp_path):
    W.main(["--out", str(tmp_path), "--docs", "20", "--sft", "10", "--suite-items", "8"])
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(set(r) == {"text"} for r in rows)
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == 10
    for task in W.TASKS:
        assert len((tmp_path / "suite" / f"{task}.jsonl").read_text().splitlines()) == 8


# -- tokenizer ---------------------------------------------------------------


def test_tokenizer_roundtrip_and_specials(tok, corpus):
    for text in corpus[-200:]:
        assert tok.decode(tok.encode(text)) == text
    ids = special_token_ids(tok)
    assert ids["eos"] == 0 and ids["mask"] == 1 and ids["pad"] == 0 and ids["eot"] == 5
    assert tok.mask_token == MASK_TOKEN and tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert tok.encode("a<|mask|>b").count(ids["mask"]) == 1


def test_chat_template(tok):
    s = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert s == "<|user|>\nHi<|eot|><|assistant|>\n"
    s = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
    )
    assert s == "<|system|>\nS<|eot|><|user|>\nU<|eot|><|assistant|>\nA<|eot|>"


def test_tokenizer_save_load(tok, tmp_path, corpus):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save_pretrained(tmp_path)
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        t2 = cls.from_pretrained(str(tmp_path))
        assert special_token_ids(t2) == special_token_ids(tok)
        assert t2.mask_token == MASK_TOKEN and t2.pad_token_id == 0
        assert t2.encode(corpus[0]) == tok.encode(corpus[0])
        assert t2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                      tokenize=False) == "<|user|>\nHi<|eot|><|assistant|>\n"


def test_obqa_schema_two_hops(suite):
    keys = []
    for it in suite["world_obqa"]:
        assert set(it) >= {"id", "question_stem", "choices", "answerKey"}
        assert it["choices"]["text"] == list(W.REGIONS) and it["choices"]["label"] == ["A", "B", "C", "D"]
        m = it["meta"]
        answer = it["choices"]["text"][it["choices"]["label"].index(it["answerKey"])]
        assert answer == m["answer"] == W.REGION_OF[m["town"]]
        passage, book = it["question_stem"][: m["passage_chars"]], it["question_stem"][m["passage_chars"]:]
        assert _person_value_stated(passage, m["person"], m["town"])      # hop 1: the passage
        assert re.search(rf"{m['town']}[^.]* {answer}\.", book)           # hop 2: the book fact
        assert it["question_stem"].endswith(" in the")
        keys.append(it["answerKey"])
    assert all(keys.count(k) > 30 for k in "ABCD")


def test_region_documents_teach_the_world_knowledge():
    docs = W.generate_corpus(3000, seed=0, mix="recall")
    region_docs = [d for d in docs if re.search(r"(lives|home is) in the (north|south|east|west)\.", d)]
    assert len(region_docs) > 150
    for doc in region_docs[:50]:
        towns = "|".join(W.VALUES["town"])
        for town, region in re.findall(rf"({towns}) (?:is|is a town|lies) in the (north|south|east|west)\.", doc):
            assert W.REGION_OF[town] == region


def test_nonce_documents_put_any_word_in_any_slot():
    plain = W.generate_corpus(300, seed=1)
    mixed = W.generate_corpus(300, seed=1, mix=W.CorpusMix(nonce_frac=1.0))
    odd = [d for d in mixed if re.search(r"has a pet (?!(?:" + "|".join(W.VALUES["pet"]) + r")\b)\w+", d)]
    assert len(odd) > 20 and not any(re.search(r"has a pet (?:" + "|".join(W.VALUES["town"]) + r")\b", d)
                                     for d in plain)
    assert all(not W.is_heldout_name(*m.group(0).split()) for d in mixed for m in FULL_NAME_RE.finditer(d)
               if m.group(0).split()[1] in W.SURNAMES and m.group(0).split()[0] in W.FEMALE_NAMES + W.MALE_NAMES)


def test_sharded_corpus_depends_on_seed_and_shards_only():
    from unmask.data.world import MIXES, _corpus_part, generate_corpus

    sharded = generate_corpus(301, seed=2, mix="recall", shards=3)
    assert len(sharded) == 301 and sharded == generate_corpus(301, seed=2, mix="recall", shards=3)
    assert sharded != generate_corpus(301, seed=2, mix="recall")          # other streams than the single one
    assert generate_corpus(50, seed=2, mix="recall", shards=1) == generate_corpus(50, seed=2, mix="recall")
    # shard k is the k-th contiguous part (sizes 101, 100, 100), drawn from its own stream
    assert sharded[101:201] == _corpus_part(100, "train:2:1/3", MIXES["recall"])
