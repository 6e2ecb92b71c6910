"""The model shipped inside the package: loads with no path, small, writes in-domain text."""

import pytest

import unmask
from unmask.models import DEFAULT_MODEL_DIR
from unmask.data.world import VALUES
from unmask.sampling.text import generate_text

@pytest.fixture(scope="module")
def bundled():
    return unmask.load()


def test_loads_without_a_path_and_is_small(bundled):
    model, tokenizer = bundled
    assert model.config.layout == "llada"
    assert sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()) < 30 * 2**20
    assert tokenizer.mask_token_id == model.config.mask_token_id


def test_generates_readable_text_without_masks(bundled):
    model, tokenizer = bundled
    [text] = generate_text(model, tokenizer, ["Nora Marsh lives in"], steps=24, gen_length=24, block_length=24)
    words = text.split()
    assert len(words) >= 3 and "<|mask|>" not in text
    assert sum(w.strip(".,?").isalpha() for w in words) >= len(words) // 2


def test_completes_facts_with_values_of_the_right_kind(bundled):
    """'X lives in' ends in a town of the world, 'X works as a' in a job, and so on (held-out names)."""
    model, tokenizer = bundled
    prompts = {"Nora Marsh lives in": "town", "Tom Hale works as a": "job", "Nora Marsh likes the colour": "colour",
               "Tom Hale lives in the town of": "town"}
    texts = generate_text(model, tokenizer, list(prompts), steps=8, gen_length=8, block_length=8)
    for (prompt, kind), text in zip(prompts.items(), texts):
        words = {w.strip(".,") for w in text.split()}
        assert words & set(VALUES[kind]), (prompt, text)
