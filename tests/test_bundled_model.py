"""The model shipped inside the package: loads with no path, writes in-domain text, uses the prompt."""

import pytest
import torch

import unmask
from unmask.models import DEFAULT_MODEL_DIR
from unmask.sampling.text import generate_text

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(),
                                reason="bundled model not built (see recipes/default_model.toml)")

PASSAGE = ("Nora Marsh lives in Ashford. Nora Marsh works as a baker. Tom Hale lives in Millbrook. "
           "Tom Hale works as a driver.")


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


def test_answers_from_the_passage(bundled):
    """The prompt matters: the answer is read from the passage (a held-out name pair)."""
    model, tokenizer = bundled
    prompts = [f"{PASSAGE}\nQuestion: What is Nora Marsh's job?\nAnswer:",
               f"{PASSAGE}\nQuestion: Where does Tom Hale live?\nAnswer:"]
    answers = generate_text(model, tokenizer, prompts, steps=8, gen_length=8, block_length=8, cfg_scale=1.0)
    assert "baker" in answers[0] and "Millbrook" in answers[1]
