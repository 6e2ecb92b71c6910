"""The row stepper (continuous batching): every row's text equals its request run alone through
`generate`, whatever its batch mates and whenever it joined."""

import random
from pathlib import Path

import pytest
import torch

import unmask
from unmask.models import load_model
from unmask.sampling import SamplerOptions
from unmask.sampling.rows import Row, step, steppable

DATA = Path(__file__).parent / "data"
MASK, EOS, EOT = 383, 381, 380


@pytest.fixture(scope="module")
def model():
    return load_model(DATA / "llada-dense-tiny", dtype=torch.float64)


def alone(model, prompt, options, seed, **end):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = unmask.generate(model, torch.tensor([prompt]), **options.kwargs(), mask_id=MASK, generator=generator, **end)
    return x[0, len(prompt):].tolist()


def run_continuous(model, requests, max_rows=None, **end):
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
        step(model, list(running.values()), pad_id=EOS)
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


def test_only_stateless_options_are_stepped():
    assert steppable(SamplerOptions(cfg_scale=1.0, threshold=0.9, guidance="acfg:0.5"))
    assert not steppable(SamplerOptions(cache="prefix"))
    with pytest.raises(ValueError, match="run it through generate"):
        Row.start([1], SamplerOptions(cache="dual"), mask_id=MASK)
