"""The fast sampling modes: KV caches, parallel decoding, compile, and `unmask bench`.

The cache is an approximation, so its tests use the cases where it is exact: a step right after a
refresh (refresh every step, or one step per block), a cached step on an unchanged canvas, and a
one-layer model (its keys/values depend only on each token and its position, so nothing cached
goes stale). Everything else is checked for the properties that must hold in any case: batch rows
equal their prompts run alone, canvases fill, EOS stops, errors say what to change.
"""

import argparse
import json
from pathlib import Path

import pytest
import torch

import unmask
from unmask.bench import answer_matches, default_modes, random_model, reference_generate
from unmask.commands import bench as bench_command
from unmask.models import KVCache, MaskedDiffusionLM, ModelConfig, load_model
from unmask.sampling import left_pad, parallel_counts

DATA = Path(__file__).parent / "data"
MASK, EOS, PAD = 383, 381, 381
KW = dict(steps=16, gen_length=32, block_length=8)


@pytest.fixture(scope="module")
def dense():
    return load_model(DATA / "llada-dense-tiny", dtype=torch.float64)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 380, (n,), generator=g).tolist() for n in (3, 9, 6)]
    return prompts, *left_pad(prompts, pad_id=PAD)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("steps,cache_refresh", [(16, 1), (4, "block")])  # every step follows a refresh
def test_cache_right_after_a_refresh_is_exact(dense, batch, cache, cfg_scale, steps, cache_refresh):
    _, ids, mask = batch
    kw = KW | dict(steps=steps, cfg_scale=cfg_scale, attention_mask=mask)
    exact = unmask.generate(dense, ids, **kw)
    assert torch.equal(unmask.generate(dense, ids, cache=cache, cache_refresh=cache_refresh, **kw), exact)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_cache_is_exact_for_a_one_layer_model(cache, cfg_scale):
    model = random_model(ModelConfig(n_layers=1), dtype=torch.float64, seed=3)
    prompt = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(1))
    exact = unmask.generate(model, prompt, cfg_scale=cfg_scale, **KW)
    assert torch.equal(unmask.generate(model, prompt, cache=cache, cfg_scale=cfg_scale, **KW), exact)


@pytest.mark.parametrize("span", [(10, 18), (10, 30)])  # dual: the block; prefix: the block to the end
def test_cached_step_on_an_unchanged_canvas_equals_full_recompute(dense, span):
    x = torch.randint(0, 384, (3, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[0, :4] = mask[2, :1] = 0  # left padding: positions must come from the full-canvas mask
    full = dense(x, attention_mask=mask).logits
    cache = KVCache(dense.config.n_layers)
    dense(x, attention_mask=mask, kv_cache=cache, logits_slice=slice(10, 18))
    start, end = span
    cached = dense(x[:, start:end], attention_mask=mask, kv_cache=cache, cache_start=start,
                   logits_slice=slice(0, 8)).logits
    torch.testing.assert_close(cached, full[:, 10:18], rtol=0, atol=1e-10)


FAST_MODES = [
    dict(cache="prefix"), dict(cache="dual", cfg_scale=1.0), dict(threshold=0.3), dict(factor=1.0, cfg_scale=1.0),
    dict(threshold=0.3, cache="dual", cfg_scale=1.0), dict(factor=2.0, cache="prefix", cache_refresh=3),
    dict(threshold=0.3, cache="dual", cfg_scale=1.0, reuse_uncond=True),
    dict(cache="prefix", cfg_scale=1.0, reuse_uncond=True, cache_refresh=3),
    dict(cache="dual", cfg_scale=1.0, cuda_graph=True), dict(threshold=0.3, cache="dual", cuda_graph=True),
]


@pytest.mark.parametrize("mode", FAST_MODES)
def test_batch_rows_equal_prompts_run_alone(dense, batch, mode):
    prompts, ids, mask = batch
    out = unmask.generate(dense, ids, attention_mask=mask, **KW, **mode)
    for row, p in enumerate(prompts):
        alone = unmask.generate(dense, torch.tensor([p]), **KW, **mode)
        assert torch.equal(out[row, -32:], alone[0, -32:])
    assert (out[0, :ids.shape[1] - 3] == PAD).all() and not (out == MASK).any()


@pytest.mark.parametrize("rule", ["low_confidence", "random", "margin", "entropy"])
@pytest.mark.parametrize("mode", [dict(threshold=0.5, cache="dual"), dict(factor=1.0, cache="prefix")])
def test_every_rule_combines_with_fast_modes_and_cfg(dense, rule, mode):
    if rule == "entropy" and "threshold" in mode:
        mode = mode | dict(threshold=-0.5)   # entropy scores are minus an entropy, <= 0
    out = unmask.generate(dense, torch.randint(0, 380, (2, 5)), remasking=rule, cfg_scale=0.5, temperature=0.7,
                          generator=torch.Generator().manual_seed(0), **KW, **mode)
    assert not (out == MASK).any()


def test_threshold_of_one_commits_one_token_per_step(dense):
    prompt = torch.randint(0, 380, (1, 5), generator=torch.Generator().manual_seed(4))
    committed = []
    out = unmask.generate(dense, prompt, **KW | dict(threshold=1.0), callback=lambda s: committed.append(int(s.committed.sum())),
                          return_dict_in_generate=True)
    assert committed == [1] * 32 and out.forward_passes == 32
    assert torch.equal(out.sequences, unmask.generate(dense, prompt, **KW | dict(steps=32)))  # = one per step


@pytest.mark.parametrize("mode", [dict(threshold=0.0), dict(factor=1e9), dict(threshold=0.0, cache="dual", cfg_scale=1.0)])
def test_permissive_parallel_decoding_fills_a_block_per_step(dense, mode):
    out = unmask.generate(dense, torch.randint(0, 380, (2, 5)), **KW, **mode, return_dict_in_generate=True)
    assert out.forward_passes == out.steps == 4 and not (out.sequences == MASK).any()


class PrefersMask(torch.nn.Module):
    """The dense fixture with the mask token's logit raised where a position's best other id falls
    below the middle of the vocabulary: there the guided or plain argmax is the mask itself."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, x, **kwargs):
        out = self.inner(x, **kwargs)
        prefer = out.logits.argmax(-1) < 190
        out.logits[..., MASK] = torch.where(prefer, out.logits.max(-1).values + 5.0, out.logits[..., MASK])
        return out


@pytest.mark.parametrize("mode", [dict(threshold=0.9), dict(factor=1.0), dict(threshold=0.9, cfg_scale=2.0),
                                  dict(threshold=0.9, cfg_scale=2.0, guidance="norm")])
def test_parallel_decoding_never_proposes_the_mask(dense, mode):
    """A block decoded by threshold/factor runs until no mask is left, so a proposed mask would
    "commit" nothing, forever: the mask is never proposed there (a fixed schedule keeps the
    reference's behaviour)."""
    model = PrefersMask(dense)
    prompt = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(9))

    def bounded(state):   # fail rather than hang: a block of 8 never needs more than 8 steps
        assert state.step < 32, "parallel decoding did not end"

    out = unmask.generate(model, prompt, **KW, **mode, mask_id=MASK, callback=bounded, return_dict_in_generate=True)
    assert not (out.sequences == MASK).any()
    exact = unmask.generate(model, prompt, **KW, mask_id=MASK)
    assert (exact[:, 5:] == MASK).any()   # the reference algorithm leaves the "committed" masks


def test_parallel_counts():
    conf = torch.tensor([[0.99, 0.9, 0.7, 0.2], [0.3, float("-inf"), 0.1, float("-inf")]])
    assert parallel_counts(conf, threshold=0.8).tolist() == [2, 1]  # at least one, even below τ
    assert parallel_counts(conf, threshold=0.05).tolist() == [4, 2]  # −inf never counts
    # factor 1: n=1: 2·0.01 < 1, n=2: 3·0.1 < 1, n=3: 4·0.3 ≥ 1
    assert parallel_counts(conf, factor=1.0).tolist() == [2, 1]
    assert parallel_counts(conf, factor=10.0).tolist() == [4, 2]


def test_finished_rows_drop_out_and_eos_stops():
    """With this model and prompts, row 0 says EOS (token 347) in its first block and row 1 never."""
    model = random_model(ModelConfig(), dtype=torch.float64, seed=4)
    prompts = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(0))
    eos = 347
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        for mode in (dict(cache="dual", cfg_scale=0.2), dict(threshold=0.3, cache="prefix"), dict(factor=1.0)):
            sizes.clear()
            out = unmask.generate(model, prompts, stop_at_eos=True, eos_token_id=eos, **KW, **mode)
            first = int((out[0, 5:] == eos).nonzero()[0])
            assert first < 8 and (out[0, 5 + first:] == eos).all() and eos not in out[1, 5:].tolist()
            guided = mode.get("cfg_scale", 0) > 0
            rows = 2 * (1 + guided)
            # the first pass runs the two rows' unconditional canvas (all masks) once; row 0 left at the end
            assert sizes[0] == rows - guided and sizes[-1] == rows // 2
            alone = unmask.generate(model, prompts[1:], stop_at_eos=True, eos_token_id=eos, **KW, **mode)
            assert torch.equal(out[1:], alone)
    finally:
        hook.remove()


def test_reuse_uncond_with_eos_stops_and_rows_leaving():
    """The model and prompts of the test above: row 0 ends in its first block, row 1 never."""
    model = random_model(ModelConfig(), dtype=torch.float64, seed=4)
    prompts = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(0))
    mode = dict(cache="dual", cfg_scale=0.2, reuse_uncond=True, stop_at_eos=True, eos_token_id=347)
    out = unmask.generate(model, prompts, **KW, **mode)
    first = int((out[0, 5:] == 347).nonzero()[0])
    assert first < 8 and (out[0, 5 + first:] == 347).all() and 347 not in out[1, 5:].tolist()
    assert torch.equal(out[1:], unmask.generate(model, prompts[1:], **KW, **mode))


def test_compile_path_gives_the_same_tokens(dense):
    prompt = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(7))
    mode = dict(cache="dual", cfg_scale=0.5, threshold=0.3)
    assert torch.equal(unmask.generate(dense, prompt, compile="eager", **KW, **mode),
                       unmask.generate(dense, prompt, **KW, **mode))
    assert "_unmask_compiled" not in "".join(dense.state_dict())


GRAPH_MODES = [dict(cache="dual"), dict(cache="dual", cfg_scale=1.0, threshold=0.3),
               dict(cache="dual", cfg_scale=0.5, reuse_uncond=True), dict(cache="dual", cache_refresh=3, factor=1.0)]


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_cuda_graph_path_gives_the_same_tokens(dense, batch, mode):
    """On the CPU the graph runner's static path runs uncaptured: same buffers and indexing as on a GPU."""
    _, ids, mask = batch
    kw = KW | dict(attention_mask=mask, stop_at_eos=True, eos_token_id=EOS) | mode
    expected = unmask.generate(dense, ids, **kw)
    assert torch.equal(unmask.generate(dense, ids, cuda_graph=True, **kw), expected)
    assert torch.equal(unmask.generate(dense, ids, cuda_graph=True, **kw), expected)  # kept caches reused
    runner = dense.__dict__["_unmask_graphed"][id(dense)]
    assert runner.caches and runner.steps and "_unmask_graphed" not in "".join(dense.state_dict())


def test_cuda_graph_path_runs_mixture_of_experts():
    model = random_model(ModelConfig(layout="lladamoe", n_experts=4, experts_per_token=2, expert_hidden_size=32,
                                     qk_norm=True), seed=5)
    prompt = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = KW | dict(cache="dual", cfg_scale=1.0)
    assert torch.equal(unmask.generate(model, prompt, cuda_graph=True, **kw), unmask.generate(model, prompt, **kw))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_reuse_uncond_is_exact_when_every_step_refreshes(dense, batch, cache):
    _, ids, mask = batch
    kw = KW | dict(cfg_scale=1.0, attention_mask=mask, cache=cache, cache_refresh=1)
    assert torch.equal(unmask.generate(dense, ids, reuse_uncond=True, **kw), unmask.generate(dense, ids, **kw))


def test_reuse_uncond_runs_the_unconditional_rows_only_at_refreshes(dense):
    """Prompts of two lengths, so the two unconditional canvases differ (none is shared)."""
    prompts = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(9)).tolist()
    ids, attention = left_pad([prompts[0], prompts[1][1:]], pad_id=381)
    sizes = []
    hook = dense.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(tuple(args[0].shape)),
                                           with_kwargs=True)
    try:
        unmask.generate(dense, ids, attention_mask=attention, cache="dual", cfg_scale=1.0, reuse_uncond=True, **KW)
    finally:
        hook.remove()
    per_block = KW["steps"] // (KW["gen_length"] // KW["block_length"])
    assert sizes == [(4, 37)] + [(2, 8)] * (per_block - 1) + ([(4, 37)] + [(2, 8)] * (per_block - 1)) * 3


class Stand_in(torch.nn.Module):
    """A non-native model (as trust_remote_code loads): no KV cache."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, x, attention_mask=None):
        return self.inner(x, attention_mask=attention_mask)


@pytest.mark.parametrize("kwargs,message", [
    (dict(cache="full"), "unknown cache"),
    (dict(cache="dual", cache_refresh=0), "cache_refresh"),
    (dict(threshold=0.9, factor=1.0), "not both"),
    (dict(factor=0.0), "factor must be a finite number > 0"),
    (dict(reuse_uncond=True, cfg_scale=1.0), "needs cache="),
    (dict(cuda_graph=True, cache="prefix"), "cache='dual'"),
])
def test_clear_errors(dense, kwargs, message):
    with pytest.raises(ValueError, match=message):
        unmask.generate(dense, torch.randint(0, 380, (1, 4)), **KW, **kwargs)


def test_cache_refuses_infilling_and_foreign_models(dense):
    prompt = torch.randint(0, 380, (1, 6))
    prompt[0, 2] = MASK
    with pytest.raises(ValueError, match="infilling"):
        unmask.generate(dense, prompt, cache="dual", **KW)
    with pytest.raises(ValueError, match="own model"):
        unmask.generate(Stand_in(dense), prompt[:, 3:], cache="dual", **KW)
    assert not (unmask.generate(dense, prompt, threshold=0.5, **KW) == MASK).any()  # infilling without a cache


def test_parallel_decoding_ignores_steps(dense):
    out = unmask.generate(dense, torch.randint(0, 380, (1, 4)), steps=3, gen_length=16, block_length=8, threshold=0.9)
    assert not (out == MASK).any()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_bench_reference_is_the_exact_algorithm(dense, cfg_scale):
    prompt = torch.randint(0, 380, (3, 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(reference_generate(dense, prompt, cfg_scale=cfg_scale, mask_id=MASK, **KW),
                       unmask.generate(dense, prompt, cfg_scale=cfg_scale, **KW))


def test_random_model_is_finite():
    model = random_model(ModelConfig(layout="lladamoe", n_experts=4, experts_per_token=2,
                                   expert_hidden_size=32, qk_norm=True))
    assert isinstance(model, MaskedDiffusionLM)
    assert torch.isfinite(model(torch.randint(0, 380, (1, 8))).logits).all()


def test_bench_command_runs_tiny_and_writes_json_and_markdown(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--shape", "tiny", "--batch-sizes", "1", "2", "--prompt-len", "6",
                              "--gen-length", "16", "--block-length", "8", "--repeats", "1", "--device", "cpu",
                              "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    rows = {(r["batch"], r["mode"]): r for r in result["rows"]}
    assert len(rows) == 2 * (1 + len(default_modes("cpu"))) and result["meta"]["hardware"]["torch"] == torch.__version__
    assert not any("graph" in mode for _, mode in rows)  # CUDA-graph modes only on a GPU
    for b in (1, 2):
        for mode in ("reference (baseline)", "exact", "exact+cfg"):
            assert rows[b, mode]["agreement"] == 1.0
        assert rows[b, "threshold 0.9"]["passes_per_token"] <= 1.0 and rows[b, "dual"]["tokens_per_s"] > 0
        assert rows[b, "dual 4/step"]["passes_per_token"] == 0.25 and rows[b, "dual 2/step"]["passes_per_token"] == 0.5
    markdown = (tmp_path / "b.md").read_text()
    assert "| 2 | threshold+dual+cfg |" in markdown and "speedup" in markdown
    assert "| 1 | dual+cfg |" in capsys.readouterr().out


@pytest.mark.parametrize("generated, target, expected", [
    (" orange. Sam Price", "orange", True), ("Orange", "orange", True), ("\n 42,", "42", True),
    (" oranges", "orange", False), ("", "orange", False), (" the orange", "orange", False)])
def test_bench_answer_matching(generated, target, expected):
    assert answer_matches(generated, target) is expected


def test_bench_suite_column(tiny_checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--model", str(tiny_checkpoint), "--suite", "--suite-items", "4",
                              "--modes", "exact", "threshold 0.9", "--batch-sizes", "2", "--prompt-len", "6",
                              "--gen-length", "16", "--block-length", "8", "--repeats", "1", "--device", "cpu",
                              "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")])
    assert args.func(args) == 0
    rows = {r["mode"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert "suite_accuracy" not in rows["reference (baseline)"]
    for mode in ("exact", "threshold 0.9"):
        assert 0.0 <= rows[mode]["suite_accuracy"] <= 1.0
        assert set(rows[mode]["suite_tasks"]) == {"know_lambada", "know_arc"}
        assert all(0.0 <= acc <= 1.0 for acc in rows[mode]["suite_tasks"].values())
    assert "| agreement | suite acc |" in (tmp_path / "b.md").read_text()
    assert "| 2 | threshold 0.9 |" in capsys.readouterr().out


def test_bench_without_agreement_runs_no_exact_reference(tmp_path):
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--shape", "tiny", "--batch-sizes", "2", "--prompt-len", "6", "--gen-length",
                              "16", "--block-length", "8", "--repeats", "1", "--device", "cpu", "--no-agreement",
                              "--modes", "dual+cfg reuse", "dual 2/step", "--json", str(tmp_path / "b.json")])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["reference (baseline)", "dual+cfg reuse", "dual 2/step"]
    assert all(r["agreement"] is None for r in rows)


def test_bench_suite_needs_a_tokenizer():
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--shape", "tiny", "--suite", "--device", "cpu"])
    with pytest.raises(ValueError, match="--suite needs a tokenizer"):
        args.func(args)


def test_cuda_graph_captures_the_compiled_forward(dense):
    prompt = torch.randint(0, 380, (2, 5), generator=torch.Generator().manual_seed(6))
    mode = dict(cache="dual", cfg_scale=0.5, threshold=0.3)
    assert torch.equal(unmask.generate(dense, prompt, cuda_graph=True, compile="eager", **KW, **mode),
                       unmask.generate(dense, prompt, **KW, **mode))
    compiled_model = dense.__dict__["_unmask_compiled"]["eager"]
    assert dense.__dict__["_unmask_graphed"][id(compiled_model)].forward is compiled_model


def test_cuda_graph_runner_keeps_only_recent_shapes(dense):
    from unmask.sampling.cuda_graph import GraphedBlockStep

    runner = GraphedBlockStep(dense, max_shapes=2)
    caches = [runner.kv_cache(1, total) for total in (40, 48)]
    assert runner.kv_cache(1, 40) is caches[0]  # reused, and now the most recent
    runner.kv_cache(2, 40)
    assert list(runner.caches) == [(1, 40), (2, 40)]  # (1, 48) was the least recently used


def test_bench_defaults_to_the_bundled_model_on_cpu_and_a_real_shape_on_gpu():
    from unmask.models import DEFAULT_MODEL_DIR

    assert bench_command.bench_model_dir(None, None, "cpu") == DEFAULT_MODEL_DIR
    assert bench_command.bench_model_dir(None, None, "cuda") is None
    assert bench_command.default_shape("cuda:0") == "llada-8b" and bench_command.default_shape("cpu") == "bundled"
    assert bench_command.bench_model_dir("some/dir", None, "cuda") == "some/dir"
    assert bench_command.bench_model_dir("some/dir", "tiny", "cpu") is None


def test_bench_lengths_default_to_what_the_model_context_holds():
    """64 + 256 where they fit; on the bundled model's 128-token context a plain `unmask bench` still
    runs (a quarter for the prompt, whole blocks in the rest); a given length is never changed."""
    assert bench_command.default_lengths(4096, 32, None, None) == (64, 256)
    assert bench_command.default_lengths(128, 32, None, None) == (32, 96)
    assert bench_command.default_lengths(128, 32, 16, None) == (16, 96)
    assert bench_command.default_lengths(128, 32, None, 64) == (32, 64)
    assert bench_command.default_lengths(128, 32, 100, 300) == (100, 300)   # refused later, by BenchConfig.check
