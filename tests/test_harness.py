"""The lm-eval adapter: local suite tasks end to end (offline) with and without CFG."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import sys  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from test_eval import make_tiny_checkpoint  # noqa: E402
from unmask.eval.encoding import encode_pair  # noqa: E402
from unmask.harness import UnmaskLM, main, suite_task_configs, write_suite_tasks  # noqa: E402
from unmask.likelihood import Request, greedy_checks, score_requests  # noqa: E402


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
    out = lm_eval.simple_evaluate(model=lm, tasks=["know_arc", "know_lambada", "world_obqa"], limit=2,
                                  task_manager=TaskManager(include_path=str(task_dir)))
    mc, cloze, obqa = out["results"]["know_arc"], out["results"]["know_lambada"], out["results"]["world_obqa"]
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


def test_llada_argument_names_and_bad_values_before_loading(ckpt, tmp_path):
    lm = UnmaskLM(model_path=str(ckpt), cfg=0.5, gen_length=8, steps=8, block_length=4, is_check_greedy=False)
    assert lm.cfg_scale == 0.5 and not lm.check_greedy and lm.options.block_length == 4
    missing = str(tmp_path / "no-such-checkpoint")   # a load would fail differently: options come first
    for bad, message in [(dict(cfg=float("nan")), "cfg_scale must be a finite number"),
                         (dict(steps=0), "steps must be a positive integer"),
                         (dict(gen_length=8, block_length=3), "multiple of block_length"),
                         (dict(mc_num=0), "mc_num must be a positive integer"),
                         (dict(mode="exactly"), "unknown likelihood mode"),
                         (dict(seed=2**64), "seed must be an integer"),
                         (dict(cfg_weight=1.0), "unknown model argument 'cfg_weight'")]:
        with pytest.raises(ValueError, match=message):
            UnmaskLM(model=missing, **bad)


def test_batched_loglikelihood_equals_one_request_at_a_time(ckpt):
    lm = UnmaskLM(model=str(ckpt), cfg_scale=1.0, mc_num=4, batch_size=2)
    pairs = [("Tom has a", " red"), ("Question: Who?\nAnswer:", " Tom Lee"), ("", " hi"), ("The cat", " sat on it")]
    together = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs], disable_tqdm=True)
    for i, p in enumerate(pairs):
        c, r = encode_pair(lm.tokenizer, *p, lm.max_len)
        [[est]] = score_requests(lm.model, [Request(c, r, i)], cfg_scales=[1.0], mc_num=4, batch_size=2)
        [greedy] = greedy_checks(lm.model, [Request(c, r)], cfg_scale=1.0)
        assert together[i] == (pytest.approx(est.value, abs=1e-5), greedy)


def test_module_cli_leaves_no_task_directory(monkeypatch, tmp_path):
    import tempfile

    import lm_eval.__main__

    seen = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(sys.argv[sys.argv.index("--include_path") + 1]))
    main(["--model", "unmask", "--tasks", "world_boolq"])
    assert seen and seen[0].startswith(str(tmp_path)) and not os.path.exists(seen[0])


def test_block_diffusion_checkpoint_through_lm_eval(tiny_llada2_checkpoint, task_dir):
    from lm_eval.tasks import TaskManager

    from unmask.likelihood import greedy_checks

    lm = UnmaskLM(model=str(tiny_llada2_checkpoint), cfg_scale=0.5, mc_num=4, batch_size=8, block_length=8)
    assert lm.block and lm.scoring["block_length"] == 8
    out = lm_eval.simple_evaluate(model=lm, tasks=["world_mc", "world_cloze"], limit=2,
                                  task_manager=TaskManager(include_path=str(task_dir)))
    assert 0 <= out["results"]["world_mc"]["acc,none"] <= 1 and out["results"]["world_cloze"]["perplexity,none"] > 1
    [(value, greedy)] = lm.loglikelihood([SimpleNamespace(args=("Tom has a", " red cap"))], disable_tqdm=True)
    c, r = encode_pair(lm.tokenizer, "Tom has a", " red cap", lm.max_len)
    [[est]] = score_requests(lm.model, [Request(c, r, 0)], cfg_scales=[0.5], mc_num=4, batch_size=8, block_length=8)
    assert value == pytest.approx(est.value, abs=1e-5)
    assert greedy == greedy_checks(lm.model, [Request(c, r)], cfg_scale=0.5, block_length=8)[0]
    text = lm.generate_until([SimpleNamespace(args=("Tom has a", {"until": [], "max_gen_toks": 10}))])[0]
    from unmask.eval.encoding import encode
    from unmask.sampling import block_generate

    ids = encode(lm.tokenizer, "Tom has a")
    out = block_generate(lm.model, torch.tensor([ids]), gen_length=10, block_length=8, cfg_scale=0.5,
                         eos_early_stop=True, generator=torch.Generator().manual_seed(0))
    assert text == lm.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    with pytest.raises(ValueError, match="remasking does not apply to block-diffusion"):
        UnmaskLM(model=str(tiny_llada2_checkpoint), remasking="random")
