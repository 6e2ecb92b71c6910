"""recipes/: every recipe a valid TrainConfig, every build_model.sh case pointing at one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from unmask.commands.train import load_recipe
from unmask.models import MaskedDiffusionLM
from unmask.models.loading import load_tokenizer
from unmask.train.trainer import TrainConfig, model_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_is_a_valid_train_config(path):
    cfg = TrainConfig(**load_recipe(str(path)))
    assert cfg.max_steps > 0 and cfg.data


def test_every_build_case_names_an_existing_recipe():
    script = (RECIPES / "build_model.sh").read_text()
    cases = dict(re.findall(r"^  ([a-z-]+)\)\s.*config=(\S+);", script, flags=re.M))
    assert {"knowledge", "knowledge-gpu", "default", "recall", "recall-gpu"} <= set(cases)
    for name, config in cases.items():
        assert (RECIPES.parent / config).is_file(), name
    usage = re.search(r"usage: bash recipes/build_model.sh ([a-z|-]+)", script).group(1).split("|")
    assert sorted(usage) == sorted(cases)


def test_the_gpu_knowledge_model_fits_the_bundled_size_limit():
    """6.8M parameters in float32 stay under the 30 MB a bundled model may take (the world's
    tokenizer, the bundled one, sets the vocabulary)."""
    cfg = TrainConfig(**load_recipe(str(RECIPES / "knowledge_model_gpu.toml")))
    with torch.device("meta"):
        model = MaskedDiffusionLM(model_config(cfg, load_tokenizer(None)))
    params = sum(p.numel() for p in model.parameters())
    assert params * 4 < 30e6
