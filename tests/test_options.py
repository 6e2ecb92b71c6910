"""The sampler's options: one check for every entry point, and the one-line CLI errors it gives."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unmask.cli import main
from unmask.models import load_model
from unmask.models.placement import resolve_device, resolve_dtype
from unmask.sampling import OptionError, SamplerOptions, check_seed

OK = dict(steps=8, gen_length=8, block_length=4)
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def dense():
    return load_model(DATA / "llada-dense-tiny")


@pytest.mark.parametrize("changes, option, message", [
    (dict(temperature=math.nan), "temperature", "finite number >= 0"),
    (dict(temperature=-0.1), "temperature", "finite number >= 0"),
    (dict(cfg_scale=math.inf), "cfg_scale", "finite number >= 0"),
    (dict(cfg_scale=-1.0), "cfg_scale", "0 turns guidance off"),
    (dict(cfg_scale=1e308), "cfg_scale", "<= 100"),   # before: ran, and gave empty text
    (dict(threshold=math.nan), "threshold", "scores are probabilities"),
    (dict(threshold=-1.0), "threshold", "> 0|>= 0"),
    (dict(threshold=1.5), "threshold", "<= 1"),
    (dict(threshold=0.5, remasking="entropy"), "threshold", "minus an entropy"),
    (dict(factor=0.0), "factor", "> 0"),
    (dict(threshold=0.5, factor=1.0), "factor", "not both"),
    (dict(steps=0), "steps", "positive integer"),
    (dict(steps=True), "steps", "positive integer"),
    (dict(steps=4.0), "steps", "positive integer"),
    (dict(block_length=0), "block_length", "positive integer"),
    (dict(block_length=-1), "block_length", "positive integer"),
    (dict(gen_length=0), "gen_length", "positive integer"),
    (dict(block_length=3), "block_length", "e.g. block_length=2"),
    (dict(block_length=16), "block_length", "multiple of block_length"),
    (dict(steps=3), "steps", "multiple of the number of blocks"),
    (dict(steps=16, block_length=8), "steps", "steps per block"),
    (dict(remasking="best"), "remasking", "unknown remasking"),
    (dict(cache="full"), "cache", "unknown cache"),
    (dict(cache="dual", cache_refresh=0), "cache_refresh", ">= 1"),
    (dict(reuse_uncond=True), "reuse_uncond", "needs cache="),
    (dict(cuda_graph=True), "cuda_graph", "cache='dual'"),
    (dict(compile=3), "compile", "backend name"),
])
def test_every_bad_option_names_itself(changes, option, message):
    with pytest.raises(OptionError, match=message) as e:
        SamplerOptions(**OK | changes).check()
    assert e.value.option == option


def test_good_options_pass_and_parallel_decoding_ignores_the_step_count():
    assert SamplerOptions(**OK).check().steps_per_block == 4
    parallel = SamplerOptions(**OK | dict(steps=3, threshold=0.9)).check()
    assert parallel.parallel and parallel.steps_per_block is None
    assert SamplerOptions(**OK | dict(threshold=-0.2, remasking="entropy")).check()
    assert SamplerOptions(**OK | dict(threshold=0.0)).check()      # 0 commits every position at once


def test_cuda_graph_is_refused_off_cuda_when_the_device_is_known():
    graphed = SamplerOptions(**OK | dict(cache="dual", cuda_graph=True))
    assert graphed.check() is graphed                               # the library runs it without capture
    with pytest.raises(OptionError, match="runs on cpu"):
        graphed.check(device="cpu")


def test_options_are_hashable_and_know_when_they_draw_noise():
    assert len({SamplerOptions(**OK), SamplerOptions(**OK)}) == 1
    assert not SamplerOptions(**OK).stochastic
    assert SamplerOptions(**OK | dict(temperature=0.5)).stochastic
    assert SamplerOptions(**OK | dict(remasking="random")).stochastic
    from unmask.sampling.options import BlockOptions

    assert not BlockOptions().stochastic and BlockOptions(temperature=0.7).stochastic


def test_seed_range_is_what_torch_accepts():
    for seed in (None, 0, -2**63, 2**64 - 1):
        assert check_seed(seed) == seed
        if seed is not None:
            torch.Generator().manual_seed(seed)
    for seed in (2**64, -2**63 - 1, 1.5, True, "3"):
        with pytest.raises(OptionError, match="seed must be an integer"):
            check_seed(seed)


def test_check_for_model_knows_vocabulary_context_and_cache_support(dense):
    opts = SamplerOptions(**OK)
    with pytest.raises(OptionError, match="outside the model's vocabulary") as e:
        opts.check_for_model(dense, 4, mask_id=10_000)
    assert e.value.option == "mask_id"
    with pytest.raises(OptionError, match="exceeds the model's context") as e:
        opts.check_for_model(dense, dense.config.max_seq_len, mask_id=dense.config.mask_token_id)
    assert e.value.option == "prompt"
    with pytest.raises(OptionError, match="infilling"):
        SamplerOptions(**OK | dict(cache="dual")).check_for_model(dense, 4, dense.config.mask_token_id,
                                                                   prompt_masked=True)


def test_dtype_aliases_and_devices():
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float32") is torch.float32 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--steps", "0"], "steps must be a positive integer"),
    (["generate", "x", "--block-length", "0"], "block_length must be a positive integer"),
    (["generate", "x", "--threshold", "1.5"], "threshold must be a finite number"),
    (["generate", "x", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "x", "--cache", "dual", "--cache-refresh", "0"], "cache_refresh"),
    (["generate", "x", "--cache", "dual", "--cuda-graph"], "cuda_graph captures CUDA graphs"),
    (["generate", "x", "--seed", str(2**64)], "seed must be an integer"),
    (["generate", "x", "--dtype", "fp8"], "unknown dtype"),
    (["chat", "--steps", "0"], "steps must be a positive integer"),
    (["generate", "x", "--top-p", "0.9"], "top_p does not apply to LLaDA (non-block-diffusion) models"),
    (["generate", "x", "--minimal-topk", "2"], "minimal_topk does not apply to LLaDA"),
    (["eval", "--cfg-scale", "nan"], "cfg_scale must be a finite number"),
    (["bench", "--batch-sizes", "0"], "batch sizes must be >= 1"),
    (["bench", "--modes", "dual+graph", "--device", "cpu"], "mode 'dual+graph': cuda_graph captures CUDA graphs"),
    (["bench", "--dtype", "fp8"], "unknown dtype"),
])
def test_cli_refuses_bad_flags_in_one_line_before_loading(argv, message, monkeypatch, capsys):
    import unmask
    from unmask.commands import bench

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(unmask, "load", no_load)
    monkeypatch.setattr(bench, "load_bench_model", no_load)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line():
    for command in (["generate", "x"], ["eval", "--limit", "1"], ["bench"]):
        r = subprocess.run([sys.executable, "-m", "unmask.cli", *command, "--device", "cuda"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_load_model_takes_dtype_aliases(tmp_path):
    model = load_model(DATA / "llada-dense-tiny", dtype="bf16")
    assert model.dtype is torch.bfloat16


def test_a_guided_request_runs_two_canvas_rows_in_both_families():
    from unmask.sampling.options import BlockOptions

    assert SamplerOptions().canvas_rows == 1 and SamplerOptions(cfg_scale=0.5).canvas_rows == 2
    assert BlockOptions().canvas_rows == 1 and BlockOptions(cfg_scale=1.0).canvas_rows == 2


def test_a_block_schedule_splits_the_block_over_its_capped_steps():
    """The public code's split: b // steps each, the first b % steps one more; steps capped at
    gen_length // minimal_topk."""
    from unmask.sampling.options import BlockOptions

    assert BlockOptions(block_length=32, steps=5).schedule == [7, 7, 6, 6, 6]
    assert BlockOptions(block_length=8, steps=32).schedule == [1] * 8 + [0] * 24
    assert BlockOptions(gen_length=12, block_length=8, steps=8, minimal_topk=4).schedule == [3, 3, 2]
