"""The lm-eval adapter: local suite tasks end to end (offline) with and without CFG."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from test_eval import make_tiny_checkpoint  # noqa: E402
from unmask.eval.encoding import encode_pair  # noqa: E402
from unmask.harness import UnmaskLM, main, suite_task_configs, write_suite_tasks  # noqa: E402
from unmask.likelihood import Request, score_requests  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_suite_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_simple_evaluate_on_local_suite(ckpt, task_dir, w):
    from lm_eval.tasks import TaskManager

    lm = UnmaskLM(model=str(ckpt), cfg_scale=w, mc_num=4, batch_size="8")
    out = lm_eval.simple_evaluate(model=lm, tasks=["world_mc", "world_cloze", "world_obqa"], limit=2,
                                  task_manager=TaskManager(include_path=str(task_dir)))
    mc, cloze, obqa = out["results"]["world_mc"], out["results"]["world_cloze"], out["results"]["world_obqa"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1 and 0 <= obqa["acc,none"] <= 1
    assert cloze["perplexity,none"] > 1 and 0 <= cloze["acc,none"] <= 1


def test_loglikelihood_matches_library(ckpt):
    lm = UnmaskLM(model=str(ckpt), cfg_scale=0.5, mc_num=4, batch_size=8, seed=3)
    pairs = [("Question: Who is it?\nAnswer:", " Tom"), ("", " hello there"), ("The cat sat on the", " warm mat")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs], disable_tqdm=True)
    for i, ((ctx, cont), (value, greedy)) in enumerate(zip(pairs, got)):
        c, r = encode_pair(lm.tokenizer, ctx, cont, lm.max_len)
        [[est]] = score_requests(lm.model, [Request(c, r, 3 * 1_000_003 + i)], cfg_scales=[0.5], mc_num=4,
                                 batch_size=8)
        assert value == pytest.approx(est.value) and isinstance(greedy, bool)
    [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=("a short document",))])
    assert rolling < 0


def test_generate_until_honours_stop_and_length(ckpt):
    lm = UnmaskLM(model=str(ckpt), cfg_scale=1.0, block_length=4)
    free = lm.generate_until([SimpleNamespace(args=("Tom has a", {"until": [], "max_gen_toks": 6}))])[0]
    assert len(lm.tokenizer.encode(free, add_special_tokens=False)) <= 6
    if len(free) >= 2:
        stop = free[1]
        cut = lm.generate_until([SimpleNamespace(args=("Tom has a", {"until": [stop], "max_gen_toks": 6}))])[0]
        assert cut == free[:free.index(stop)]


def test_suite_yaml_points_at_shipped_files(task_dir):
    for name, cfg in suite_task_configs().items():
        written = json.loads((task_dir / f"{name}.yaml").read_text())
        assert written["dataset_kwargs"] == cfg["dataset_kwargs"]
        assert os.path.isabs(cfg["dataset_kwargs"]["data_files"]["test"])
        assert os.path.exists(cfg["dataset_kwargs"]["data_files"]["test"])


@pytest.mark.slow
def test_module_cli_runs_lm_eval(ckpt, tmp_path, capsys):
    main(["--model", "unmask", "--model_args", f"model={ckpt},cfg_scale=0.5,mc_num=4", "--tasks", "world_boolq",
          "--limit", "2", "--output_path", str(tmp_path)])
    assert "world_boolq" in capsys.readouterr().out
    assert list(tmp_path.rglob("results_*.json"))
