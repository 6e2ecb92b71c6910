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
