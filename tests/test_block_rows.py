"""The block-diffusion row stepper (continuous batching for LLaDA2.x): every row's text equals its
request run alone through `block_generate` (its exact cache on), whatever its batch mates and
whenever it joined, and a row alone runs the cached passes `block_generate` runs."""

import random
from collections import Counter

import pytest
import torch

import unmask
from unmask.sampling import SamplerOptions
from unmask.sampling.block_rows import BlockRow, block_step, block_steppable
from unmask.sampling.blocks import decoded_text_end
from unmask.sampling.options import BlockOptions

MASK = 383

MIXED = [
    BlockOptions(gen_length=16, block_length=8, steps=4, threshold=None),
    BlockOptions(gen_length=24, block_length=8, steps=8, threshold=0.05, cfg_scale=1.0),
    BlockOptions(gen_length=32, block_length=16, steps=4, threshold=0.95, cfg_scale=0.5, reuse_uncond=True),
    BlockOptions(gen_length=16, block_length=4, steps=2, threshold=0.1, guidance="linear", cfg_scale=2.0),
    BlockOptions(gen_length=20, block_length=8, steps=8, threshold=None, cfg_scale=1.0, guidance="span:0:-2"),
    BlockOptions(gen_length=40, block_length=32, steps=32, threshold=0.95),
    BlockOptions(gen_length=16, block_length=8, steps=8, threshold=0.02, guidance="linear,norm", cfg_scale=1.0),
    BlockOptions(gen_length=24, block_length=8, steps=4, threshold=None, guidance="interval:0.3:0.7", cfg_scale=1.5),
    BlockOptions(gen_length=24, block_length=8, steps=4, threshold=0.5, guidance="interval:0.5:1", cfg_scale=1.0,
                 reuse_uncond=True),
]


@pytest.fixture(scope="module")
def model(tiny_llada2_checkpoint):
    return unmask.load(tiny_llada2_checkpoint)[0]


@pytest.fixture(scope="module")
def eos(model):
    """The token this random model emits most often, taken as EOS so that texts do end early and
    the EOS rules (eos_early_stop, the end after a block) are exercised."""
    x = unmask.block_generate(model, torch.tensor([[5, 6, 7], [8, 9, 10]]), gen_length=64, block_length=16, steps=16,
                              threshold=None, mask_id=MASK)
    return Counter(x[:, 3:].flatten().tolist()).most_common(1)[0][0]


def alone(model, prompt, options, seed, eos_id, early):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = unmask.block_generate(model, torch.tensor([prompt]), **options.kwargs(), mask_id=MASK, eos_id=eos_id,
                              eos_early_stop=early, generator=generator)
    return x[0, len(prompt):].tolist()


def run_rows(model, requests, eos_id, early, pass_overhead=None):
    """Run (prompt, options, seed, admit_at_step) requests through `block_step`, each admitted at
    its step; returns each row's generated tokens."""
    waiting = sorted(range(len(requests)), key=lambda i: requests[i][3])
    running: dict[int, BlockRow] = {}
    out: dict[int, list[int]] = {}
    clock = 0
    while waiting or running:
        while waiting and requests[waiting[0]][3] <= clock:
            i = waiting.pop(0)
            prompt, options, seed, _ = requests[i]
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            running[i] = BlockRow.start(prompt, options, model=model, mask_id=MASK, generator=generator,
                                        eos_id=eos_id, eos_early_stop=early)
        block_step(model, list(running.values()), pad_id=0, pass_overhead=pass_overhead)
        for i in [i for i, r in running.items() if r.done]:
            out[i] = running.pop(i).gen.tolist()
        clock += 1
    return [out[i] for i in range(len(requests))]


def test_only_a_schedule_reads_the_clock_in_block_rows(model, clock_reads):
    """A constant-guidance row never computes the unmasked fraction; a linear one does; both equal
    their request alone."""
    calls = clock_reads("unmask.sampling.block_rows")
    for form, clock in (("constant", False), ("linear", True)):
        options = BlockOptions(gen_length=8, block_length=4, steps=4, threshold=None, cfg_scale=1.0, guidance=form)
        calls.clear()
        assert run_rows(model, [([5, 6, 7], options, None, 0)], None, False) == [
            alone(model, [5, 6, 7], options, None, None, False)]
        assert bool(calls) == clock, form


@pytest.mark.parametrize("temperature, early, overhead", [(0.0, False, None), (0.0, True, 20.0), (0.7, True, None)])
def test_rows_equal_block_generate_alone_with_mixed_settings_and_random_admission(model, eos, temperature, early,
                                                                                  overhead):
    """Nine settings (threshold or schedule, block lengths 4-32, CFG with reuse_uncond, a span,
    the linear schedule and its normalisation, intervals whose idle steps run no unconditional
    rows, with and without reuse_uncond), prompts of 1-40 tokens (a row's first step runs
    its whole prompt against an empty cache, the others one block), joining at random steps; in
    one pass, or split by width (overhead 20)."""
    rng = random.Random(int(temperature * 10) + early)
    requests = []
    for k, options in enumerate(MIXED):
        if temperature:
            options = BlockOptions(**{**options.kwargs(), "temperature": temperature, "top_k": 50})
        prompt = [rng.randrange(0, 380) for _ in range(rng.randrange(1, 40))]
        requests.append((prompt, options.check(), 100 + k if temperature else None, rng.randrange(0, 12)))
    got = run_rows(model, requests, eos, early, overhead)
    expected = [alone(model, p, o, s, eos, early) for p, o, s, _ in requests]
    assert got == expected
    ended = [g.index(eos) for g in got if eos in g]
    assert ended and min(ended) < 12, "no text ended early: the EOS rules went untested"


def test_a_row_alone_runs_the_passes_block_generate_runs(model, eos):
    """The exact cache per row: the same number of passes over the same spans (a block's first step
    runs the columns since the cache's end, later steps the block alone) as `block_generate`."""
    widths = []

    def record(module, args, kwargs):
        widths.append((args[0] if args else kwargs["input_ids"]).shape[1])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        options = BlockOptions(gen_length=40, block_length=8, steps=4, threshold=0.05, cfg_scale=1.0).check()
        prompt = list(range(10, 29))
        expected = alone(model, prompt, options, None, eos, True)
        reference = list(widths)
        widths.clear()
        row = BlockRow.start(prompt, options, model=model, mask_id=MASK, eos_id=eos, eos_early_stop=True)
        while not row.done:
            block_step(model, [row])
    finally:
        hook.remove()
    assert row.gen.tolist() == expected
    assert len(reference) > 4 and len(widths) == len(reference) // 2   # block_generate runs each branch apart
    assert widths == reference[::2] and reference[::2] == reference[1::2]


def test_block_steppable_needs_block_options_and_the_native_model(model):
    options = BlockOptions(gen_length=8, block_length=8, steps=8).check()
    assert block_steppable(model, options)
    assert not block_steppable(model, SamplerOptions(steps=8, gen_length=8, block_length=8))
    assert not block_steppable(torch.nn.Linear(2, 2), options)
    with pytest.raises(ValueError, match="own model"):
        BlockRow.start([1, 2], options, model=torch.nn.Linear(2, 2), mask_id=MASK)
    with pytest.raises(ValueError, match="EOS id"):
        BlockRow.start([1, 2], options, model=model, mask_id=MASK, eos_early_stop=True)


def test_a_text_ends_at_a_decoded_eos_only():
    """eos_early_stop's rule: the text's length through its first EOS once nothing before it is masked."""
    EOS = 7
    assert decoded_text_end(torch.tensor([4, 5, EOS, MASK, 9]), EOS, MASK) == 3
    assert decoded_text_end(torch.tensor([4, MASK, EOS, EOS]), EOS, MASK) is None
    assert decoded_text_end(torch.tensor([EOS]), EOS, MASK) == 1
    assert decoded_text_end(torch.tensor([4, 5, MASK]), EOS, MASK) is None
