"""scripts/eval_checkpoints.py: accuracy against training tokens over a run's checkpoints."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from test_eval import make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import eval_checkpoints  # noqa: E402


def test_checkpoints_are_spread_over_the_run(tmp_path):
    for step in range(1, 11):
        (tmp_path / f"step-{step:06d}").mkdir()
        (tmp_path / f"step-{step:06d}" / "config.json").write_text("{}")
    picked = [p.name for p in eval_checkpoints.checkpoints(tmp_path, 5)]
    assert picked == ["step-000001", "step-000003", "step-000005", "step-000008", "step-000010"]
    assert len(eval_checkpoints.checkpoints(tmp_path, 20)) == 10
    with pytest.raises(SystemExit, match="no step-"):
        eval_checkpoints.checkpoints(tmp_path / "nothing", 5)


def test_curve_of_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    for step in (100, 200):
        shutil.copytree(ckpt, run / f"step-{step:06d}")
    (run / "train_config.json").write_text(json.dumps({"batch_size": 4, "grad_accum": 2, "seq_len": 32}))
    eval_checkpoints.main([str(run), "--out", str(tmp_path / "curve"), "--tasks", "world_mc,world_cloze",
                           "--limit", "2", "--cfg-scale", "0", "1"])
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["cfg_scales"] == [0.0, 1.0]
    assert [c["tokens"] for c in curve["curve"]] == [100 * 256, 200 * 256]
    assert set(curve["curve"][0]["acc"]) == {"world_mc", "world_cloze"}
    assert all(len(a) == 2 and all(0 <= x <= 1 for x in a) for a in curve["curve"][1]["acc"].values())
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert "| step-000200 | 0.1M |" in capsys.readouterr().out
