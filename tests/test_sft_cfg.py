"""scripts/sft_cfg.py: the three-arm SFT table scores each item as `unmask eval` does."""

import sys
from pathlib import Path

import pytest

import unmask
from unmask.eval import EvalConfig, get_task, load_items
from unmask.eval.runner import evaluate
from unmask.eval.tasks import SUITE_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sft_cfg  # noqa: E402


@pytest.mark.parametrize("name", ["know_arc", "know_lambada"])
def test_per_item_agrees_with_unmask_eval(name, tmp_path):
    """Per-item outcomes at each w average to `unmask eval`'s accuracy on the same items, for a
    choice task and a cloze task (judged by the sampler at that w)."""
    model, tok = unmask.load()
    lines = (SUITE_DIR / f"{name}.jsonl").read_text().splitlines()[:6]
    (tmp_path / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    task = get_task(name)
    config = EvalConfig(cfg_scales=(0.0, 2.0), mode="chain", progress=False)
    outcomes = sft_cfg.per_item(model, tok, task, load_items(task, tmp_path), [0.0, 2.0], config)
    result = evaluate(model, tok, [task], tmp_path, config)[0]
    for s, w in enumerate((0.0, 2.0)):
        assert len(outcomes[w]) == 6
        assert sum(outcomes[w]) / 6 == pytest.approx(result.metrics["acc"][s].value)
