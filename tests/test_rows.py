"""The row stepper (continuous batching): every row's text equals its request run alone through
`generate`, whatever its batch mates and whenever it joined."""

import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import unmask
from unmask.models import load_model
from unmask.sampling import SamplerOptions
from unmask.sampling.rows import Row, measure_pass_overhead, pass_groups, step, steppable

DATA = Path(__file__).parent / "data"
MASK, EOS, EOT = 383, 381, 380


@pytest.fixture(scope="module")
def model():
    return load_model(DATA / "llada-dense-tiny", dtype=torch.float64)


def alone(model, prompt, options, seed, **end):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = unmask.generate(model, torch.tensor([prompt]), **options.kwargs(), mask_id=MASK, generator=generator, **end)
    return x[0, len(prompt):].tolist()


def run_continuous(model, requests, max_rows=None, pass_overhead=None, **end):
    """Run (prompt, options, seed, admit_at_step) requests through `step`, admitting each at its
    step (and while fewer than max_rows run); returns each row's generated tokens."""
    waiting = sorted(range(len(requests)), key=lambda i: requests[i][3])
    running: dict[int, Row] = {}
    out: dict[int, list[int]] = {}
    clock = 0
    while waiting or running:
        while waiting and requests[waiting[0]][3] <= clock and (max_rows is None or len(running) < max_rows):
            i = waiting.pop(0)
            prompt, options, seed, _ = requests[i]
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            running[i] = Row.start(prompt, options, mask_id=MASK, generator=generator, **end)
        step(model, list(running.values()), pad_id=EOS, pass_overhead=pass_overhead)
        for i in [i for i, r in running.items() if r.done]:
            out[i] = running.pop(i).gen.tolist()
        clock += 1
    return [out[i] for i in range(len(requests))]


MIXED = [
    SamplerOptions(steps=8, gen_length=16, block_length=8),
    SamplerOptions(steps=16, gen_length=16, block_length=4, cfg_scale=1.0),
    SamplerOptions(steps=12, gen_length=24, block_length=8, cfg_scale=2.0, guidance="linear"),
    SamplerOptions(steps=8, gen_length=8, block_length=8, cfg_scale=1.5, guidance="span:0:-2"),
    SamplerOptions(steps=4, gen_length=32, block_length=8, remasking="margin"),
    SamplerOptions(gen_length=16, block_length=8, threshold=0.2),
    SamplerOptions(gen_length=16, block_length=16, factor=1.0, cfg_scale=0.5),
    SamplerOptions(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, guidance="acfg:0.5"),
    SamplerOptions(steps=16, gen_length=16, block_length=16, remasking="entropy", guidance="interval:0.2:0.8",
                   cfg_scale=1.0),
]


def requests_for(seed: int, temperature: float):
    rng = random.Random(seed)
    reqs = []
    for k, options in enumerate(MIXED):
        if temperature:
            options = SamplerOptions(**{**options.kwargs(), "temperature": temperature})
        prompt = [rng.randrange(0, 380) for _ in range(rng.randrange(1, 12))]
        reqs.append((prompt, options, 100 + k if temperature else None, rng.randrange(0, 10)))
    return reqs


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_equal_generate_alone_with_mixed_settings_and_random_admission(model, temperature):
    reqs = requests_for(1, temperature)
    got = run_continuous(model, reqs)
    for (prompt, options, seed, _), tokens in zip(reqs, got):
        assert tokens == alone(model, prompt, options, seed), options


@pytest.mark.parametrize("pass_overhead", [0.0, 12.0])
def test_rows_split_into_passes_by_width_equal_generate_alone(model, pass_overhead):
    """Rows run in several passes (grouped by canvas width, `pass_groups`) keep their text."""
    reqs = requests_for(4, 0.8)
    got = run_continuous(model, reqs, pass_overhead=pass_overhead)
    for (prompt, options, seed, _), tokens in zip(reqs, got):
        assert tokens == alone(model, prompt, options, seed), options


CACHED = [
    SamplerOptions(steps=8, gen_length=16, block_length=8, cache="prefix"),
    SamplerOptions(steps=16, gen_length=16, block_length=4, cache="dual", cfg_scale=1.0),
    SamplerOptions(steps=12, gen_length=24, block_length=8, cache="dual", cfg_scale=2.0, reuse_uncond=True,
                   guidance="linear"),
    SamplerOptions(steps=16, gen_length=32, block_length=16, cache="prefix", cache_refresh=3, cfg_scale=0.5,
                   reuse_uncond=True),
    SamplerOptions(gen_length=16, block_length=8, cache="dual", threshold=0.2, cache_refresh=2),
    SamplerOptions(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, guidance="span:0:-2", cache="dual"),
    SamplerOptions(steps=8, gen_length=16, block_length=8),   # no cache: its own pass, the same step
    SamplerOptions(steps=8, gen_length=8, block_length=8, cfg_scale=1.0),
]


@pytest.mark.parametrize("dtype, temperature, pass_overhead", [(torch.float64, 0.0, None),
                                                               (torch.float64, 0.8, 12.0),
                                                               (torch.float32, 0.0, None)])
def test_cached_rows_equal_generate_alone(dtype, temperature, pass_overhead):
    """Prefix and dual caches (refreshed per block or every N steps, reuse_uncond, guidance forms,
    threshold decoding) stepped per row, each against its own cache, beside rows without one,
    joining at random steps: each text equals `generate(cache=...)` for the row alone."""
    model = load_model(DATA / "llada-dense-tiny", dtype=dtype)
    rng = random.Random(7 + int(temperature * 10))
    reqs = []
    for k, options in enumerate(CACHED):
        if temperature:
            options = SamplerOptions(**{**options.kwargs(), "temperature": temperature})
        prompt = [rng.randrange(0, 380) for _ in range(rng.randrange(1, 24))]
        reqs.append((prompt, options.check(), 100 + k if temperature else None, rng.randrange(0, 10)))
    got = run_continuous(model, reqs, pass_overhead=pass_overhead)
    for (prompt, options, seed, _), tokens in zip(reqs, got):
        assert tokens == alone(model, prompt, options, seed), options


def partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [[first]] + part
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]


def pass_cost(groups, widths, weights, overhead):
    return sum(overhead + max(widths[i] for i in g) * sum(weights[i] for i in g) for g in groups)


@pytest.mark.parametrize("seed", range(20))
def test_pass_groups_is_the_cheapest_of_all_partitions(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 7)
    widths = [rng.randrange(8, 200) for _ in range(n)]
    weights = [rng.choice((1, 2)) for _ in range(n)]
    overhead = rng.choice((0.0, 10.0, 60.0, 500.0))
    groups = pass_groups(widths, weights, overhead)
    assert sorted(i for g in groups for i in g) == list(range(n))
    cheapest = min(pass_cost(p, widths, weights, overhead) for p in partitions(list(range(n))))
    assert pass_cost(groups, widths, weights, overhead) == pytest.approx(cheapest)


def test_pass_groups_shares_one_pass_when_passes_are_dear_and_splits_when_padding_is():
    widths, weights = [32, 40, 160, 170], [1, 2, 1, 1]
    assert pass_groups(widths, weights, 10_000) == [[0, 1, 2, 3]]
    assert sorted(map(sorted, pass_groups(widths, weights, 20))) == [[0, 1], [2, 3]]


class TimedModel(torch.nn.Module):
    """A stand-in whose forward takes `fixed` seconds plus `per_token` per input token."""

    def __init__(self, fixed, per_token):
        super().__init__()
        self.fixed, self.per_token = fixed, per_token
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, attention_mask=None):
        time.sleep(self.fixed + self.per_token * x.numel())
        return SimpleNamespace(logits=torch.zeros(*x.shape, 4))


def test_measure_pass_overhead_finds_the_fixed_cost_in_tokens():
    overhead = measure_pass_overhead(TimedModel(fixed=0.02, per_token=1e-4), repeats=3)
    assert 150 < overhead < 260   # 0.02 s / 1e-4 s per token = 200 tokens


def test_rows_equal_generate_alone_with_eos_handling_and_a_row_cap(model):
    """The server's EOS settings (eos_last, stop_at_eos: rows end early) with at most 3 rows at once."""
    end = dict(eos_token_id=EOS, eot_token_id=EOT, eos_last=True, stop_at_eos=True)
    reqs = requests_for(2, 0.0)[:6]
    got = run_continuous(model, reqs, max_rows=3, **end)
    for (prompt, options, seed, _), tokens in zip(reqs, got):
        assert tokens == alone(model, prompt, options, seed, **end), options


def test_rows_equal_generate_alone_in_float32():
    """The default dtype: padding and batch mates leave a greedy row's text unchanged."""
    model = load_model(DATA / "llada-dense-tiny")
    reqs = [(p, o, None, a) for p, o, _, a in requests_for(3, 0.0)[:4]]
    got = run_continuous(model, reqs)
    for (prompt, options, seed, _), tokens in zip(reqs, got):
        assert tokens == alone(model, prompt, options, seed), options


@pytest.mark.parametrize("cache", [None, "dual"])
def test_constant_guidance_rows_never_compute_the_schedule_clock(model, clock_reads, cache):
    """Only a schedule reads t (`Row.t`); a constant-guidance row steps to its tokens alone without
    computing it, while a linear-schedule row does."""
    counted = clock_reads("unmask.sampling.rows")
    for form, clock in (("constant", False), ("acfg:0.5", False), ("linear", True)):
        options = SamplerOptions(steps=8, gen_length=8, block_length=4, cfg_scale=1.0, guidance=form,
                                 cache=None if form.startswith("acfg") else cache)
        counted.clear()
        assert run_continuous(model, [([5, 6, 7], options, None, 0)]) == [alone(model, [5, 6, 7], options, None)]
        assert bool(counted) == clock, form


def test_a_row_takes_generates_step_count(model):
    options = SamplerOptions(steps=8, gen_length=16, block_length=8)
    row = Row.start([1, 2, 3], options, mask_id=MASK)
    n = 0
    while not row.done:
        step(model, [row])
        n += 1
        assert int(row.last.committed.sum()) == 2   # 16 tokens over 8 steps
    out = unmask.generate(model, torch.tensor([[1, 2, 3]]), **options.kwargs(), return_dict_in_generate=True)
    assert n == row.step_index == out.steps == 8


def test_graphs_and_compile_are_not_stepped():
    """Caches are stepped (each row keeps its own); a CUDA graph or a compiled call is fixed for a
    whole call."""
    assert steppable(SamplerOptions(cfg_scale=1.0, threshold=0.9, guidance="acfg:0.5"))
    assert steppable(SamplerOptions(cache="prefix")) and steppable(SamplerOptions(cache="dual", reuse_uncond=True,
                                                                                  cfg_scale=1.0))
    assert not steppable(SamplerOptions(cache="dual", cuda_graph=True))
    assert not steppable(SamplerOptions(compile=True))
    with pytest.raises(ValueError, match="run it through generate"):
        Row.start([1], SamplerOptions(cache="dual", cuda_graph=True), mask_id=MASK)
