"""The model shipped inside the package: loads with no path, small, knows the facts of its world."""

import pytest

import unmask
from unmask.data import knowledge as K
from unmask.data.world import VALUES
from unmask.models import DEFAULT_MODEL_DIR
from unmask.sampling.text import generate_text

HELDOUT = [p for p in K.load_population() if p["split"] == "heldout"]


@pytest.fixture(scope="module")
def bundled():
    return unmask.load()


def test_loads_without_a_path_and_is_small(bundled):
    model, tokenizer = bundled
    assert model.config.layout == "llada"
    assert sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()) < 30 * 2**20
    assert tokenizer.mask_token_id == model.config.mask_token_id


def test_answers_what_pet_a_heldout_person_has(bundled):
    """The main job: "Question: What pet does X have?\\nAnswer:" about people whose questions never
    appeared in training, answered from their biographies."""
    model, tokenizer = bundled
    people = HELDOUT[:40]
    prompts = [f"Question: What pet does {p['name']} have?\nAnswer:" for p in people]
    texts = generate_text(model, tokenizer, prompts, steps=4, gen_length=4, block_length=4)
    right = sum(t.split()[0].strip(".,") == p["facts"]["pet"] for t, p in zip(texts, people) if t.split())
    assert right >= 36, list(zip(texts, people))   # 90 %; measured: 40 of 40


def test_generates_readable_text_with_values_of_the_right_kind(bundled):
    model, tokenizer = bundled
    name = HELDOUT[0]["name"]
    prompts = {f"{name} lives in": "town", f"{name} works as a": "job", f"{name} has a pet": "pet"}
    texts = generate_text(model, tokenizer, list(prompts), steps=8, gen_length=8, block_length=8)
    for (prompt, kind), text in zip(prompts.items(), texts):
        words = {w.strip(".,") for w in text.split()}
        assert "<|mask|>" not in text and words & set(VALUES[kind]), (prompt, text)


def test_guidance_examples_ask_every_heldout_person_every_fact_in_a_training_phrasing():
    """scripts/guidance_examples.py, behind the README's "Two prompts where guidance changes the answer"."""
    import sys
    from pathlib import Path

    from unmask.data.world import QUESTIONS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import guidance_examples

    items = guidance_examples.questions(HELDOUT)
    assert len(items) == len(HELDOUT) * len(K.ATTRIBUTES) == 1200
    first = HELDOUT[0]
    assert items[2] == (f"Question: What pet does {first['name']} have?\nAnswer:", first["facts"]["pet"], first["mentions"])
    held_out = [q.split("{")[0] for qs in QUESTIONS.values() for q, held in qs if held]
    assert not any(p.startswith("Question: " + h) for p, _, _ in items for h in held_out)
