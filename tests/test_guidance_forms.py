"""Every form of guidance (unmask.sampling.guidance) against a plain reference written from its
formula: schedules of w, the partial-prompt and A-CFG unconditional canvases, PMI scoring, on
both sampler families and the likelihood scorer; batched rows equal to rows alone; the form
reaches the options, CLI, server, lm-eval adapter and bench, and bad forms are refused once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import unmask
from unmask.likelihood import PMI, Request, exact_plan, score_requests
from unmask.models import load_model
from unmask.sampling import OptionError, SamplerOptions, block_generate, left_pad, mix_guidance
from unmask.models import KVCache
from unmask.sampling import guidance as guidance_module
from unmask.sampling.guidance import (Constant, Guidance, Interval, Linear, LowConfidence, PromptSpan,
                                      WholePrompt, branch_logits, same_rows)
from unmask.sampling.options import BlockOptions, check_scoring_guidance

DATA = Path(__file__).parent / "data"
MASK = 383


@pytest.fixture(scope="module")
def dense():
    return load_model(DATA / "llada-dense-tiny")


@pytest.fixture(scope="module")
def llada2():
    return load_model(DATA / "llada2-moe-tiny")


# ---- plain references, written from the formulas in docs/guidance.md ----

def schedule_factor(form: str, t: float) -> float:
    """s(t) for 'constant' | 'linear' | 'interval:lo:hi'."""
    if form == "constant":
        return 1.0
    if form == "linear":
        return t
    lo, hi = (float(v) for v in form.split(":")[1:])
    return 1.0 if lo <= t <= hi else 0.0


def span_columns(prompt_columns: list[int], start, stop) -> list[int]:
    """The prompt columns a span masks: Python slicing of the list of prompt token columns."""
    return prompt_columns[start:stop]


@torch.no_grad()
def plain_guided(model, prompt, steps, gen_length, block_length, w, schedule="constant", span=None, acfg=None,
                 norm=False, threshold=None):
    """SPEC.md §3 (batch 1, temperature 0, low_confidence) with w_t = w · s(t), t = unmasked fraction
    of the generated positions before the step (w_t = 0: no guidance, the conditional logits); the unconditional canvas masks the prompt columns
    `span` selects (all when None), or, for A-CFG (acfg = ρ), keeps the prompt and re-masks the
    ⌈ρ·n⌉ committed generated tokens whose top conditional probability is lowest. `norm` (Rojas et
    al.): positions are ranked by the conditional model's top probability, tokens are the guided
    argmax. `threshold` τ: a block step commits every position scoring >= τ (at least one) until
    the block is full, instead of the schedule's counts."""
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), MASK, dtype=torch.long)
    x[0, :P] = prompt[0]
    prompt_cols = [j for j in range(P) if x[0, j] != MASK]
    generated = [j for j in range(P + gen_length) if j not in prompt_cols]
    masked_cols = prompt_cols if span is None else span_columns(prompt_cols, *span)
    per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        start, end = P + b * block_length, P + (b + 1) * block_length
        n = sum(int(x[0, j] == MASK) for j in range(start, end))
        counts = [n // per_block + (1 if s < n % per_block else 0) for s in range(per_block)]
        for s in (range(per_block) if threshold is None else range(block_length)):
            if not any(x[0, j] == MASK for j in range(start, end)):
                break
            t = sum(int(x[0, j] != MASK) for j in generated) / len(generated)
            w_t = w * schedule_factor(schedule, t)
            cond = model(x).logits
            if w > 0:
                un = x.clone()
                if acfg is None:
                    for j in masked_cols:
                        un[0, j] = MASK
                else:
                    probs = torch.softmax(cond[0].float(), -1)
                    committed = [j for j in generated if j < end and x[0, j] != MASK]
                    committed.sort(key=lambda j: float(probs[j].max()))
                    for j in committed[:math.ceil(len(committed) * acfg)]:
                        un[0, j] = MASK
                uncond = model(un).logits
                logits = cond if w_t == 0 else uncond + (w_t + 1) * (cond - uncond)
            else:
                logits = cond
            rate = torch.softmax(cond if norm else logits, -1)
            scored = sorted(((float(rate[0, j].max()), j, int(logits[0, j].argmax()))
                             for j in range(end) if x[0, j] == MASK), key=lambda c: -c[0])
            count = counts[s] if threshold is None else max(1, sum(c[0] >= threshold for c in scored))
            for _, j, token in scored[:count]:
                x[0, j] = token
    return x


@torch.no_grad()
def plain_block_guided(model, prompt, gen_length, b, steps, w, schedule="constant", span=None, mask_id=None,
                       norm=False):
    """LLaDA2 block decoding (batch 1, no cache, schedule counts only) guided by a form; `norm`
    ranks positions by the conditional model's top probability."""
    P = prompt.shape[1]
    total = -(-(P + gen_length) // b) * b
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[0, :P] = prompt[0]
    n_blocks = total // b
    allowed = torch.tril(torch.ones(n_blocks, n_blocks, dtype=torch.bool)).repeat_interleave(b, 0)
    allowed = allowed.repeat_interleave(b, 1)
    masked_cols = span_columns(list(range(P)), *(span or (None, None)))
    counts = [b // steps + (1 if i < b % steps else 0) for i in range(steps)]
    for k in range(P // b, n_blocks):
        s, e = k * b, (k + 1) * b
        for i in range(steps):
            if not (x[0, s:e] == mask_id).any():
                break
            t = sum(int(x[0, j] != mask_id) for j in range(P, P + gen_length)) / gen_length
            w_t = w * schedule_factor(schedule, t)
            un = x.clone()
            for j in masked_cols:
                un[0, j] = mask_id
            kw = dict(attention_mask=allowed[:e, :e][None, None], position_ids=torch.arange(e)[None])
            cond = model(x[:, :e], **kw).logits[0, s:e]
            uncond = model(un[:, :e], **kw).logits[0, s:e]
            logits = cond if w_t == 0 else uncond + (w_t + 1) * (cond - uncond)
            confidence, tokens = torch.softmax(logits.float(), -1).max(-1)
            if norm:
                confidence = torch.softmax(cond.float(), -1).max(-1).values
            candidates = x[0, s:e] == mask_id
            confidence = torch.where(candidates, confidence, torch.tensor(float("-inf")))
            transfer = torch.zeros(b, dtype=torch.bool)
            transfer[confidence.topk(min(counts[i], int(candidates.sum()))).indices] = True
            x[0, s:e] = torch.where(transfer, tokens, x[0, s:e])
    return x[:, :P + gen_length]


# ---- the object ----

@pytest.mark.parametrize("spec,schedule,canvas", [
    ("", Constant(), WholePrompt()),
    ("linear", Linear(), WholePrompt()),
    ("interval:0.25:0.75", Interval(0.25, 0.75), WholePrompt()),
    ("span:0:-4", Constant(), PromptSpan(0, -4)),
    ("linear, span:-3:", Linear(), PromptSpan(-3, None)),
    ("acfg:0.5,interval:0:0.5", Interval(0, 0.5), LowConfidence(0.5)),
    ("norm", Constant(), WholePrompt()),
    ("span:0:-4, norm, linear", Linear(), PromptSpan(0, -4)),
])
def test_spec_parses_and_round_trips(spec, schedule, canvas):
    g = Guidance.parse(spec)
    assert (g.schedule, g.canvas, g.normalized) == (schedule, canvas, "norm" in spec)
    assert Guidance.parse(str(g)) == g
    assert Guidance.parse(g.short()) == g


@pytest.mark.parametrize("spec,message", [
    ("cosine", "unknown guidance part 'cosine'"),
    ("linear,constant", "two schedules"),
    ("span:0:2,acfg:0.5", "two unconditional canvases"),
    ("interval:0.8:0.2", "0 <= LO <= HI <= 1"),
    ("interval:0.5", "interval:LO:HI"),
    ("span:a:2", "integers or empty"),
    ("span:2", "span:START:STOP"),
    ("acfg:0", "(0, 1]"),
    ("linear:2", "takes no arguments"),
    ("norm,norm", "'norm' once"),
    ("norm:1", "without arguments"),
])
def test_bad_specs_are_option_errors_naming_guidance(spec, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        SamplerOptions(cfg_scale=1.0, guidance=spec).check()
    assert e.value.option == "guidance"


def test_options_store_the_canonical_spelling():
    assert SamplerOptions(guidance="span:0:-4").guidance == "constant,span:0:-4"
    assert SamplerOptions(guidance="linear") == SamplerOptions(guidance="linear,prompt")


def test_combinations_refused_where_the_form_cannot_work():
    with pytest.raises(OptionError, match="cache=None with acfg"):
        SamplerOptions(cfg_scale=1.0, guidance="acfg:0.5", cache="dual").check()
    with pytest.raises(OptionError, match="LLaDA sampler only"):
        BlockOptions(cfg_scale=1.0, guidance="acfg:0.5").check()
    with pytest.raises(OptionError, match="scoring has none"):
        check_scoring_guidance("acfg:0.5")
    SamplerOptions(cfg_scale=0.0, guidance="acfg:0.5", cache="dual").check()   # w = 0: no guidance, nothing to refuse
    BlockOptions(cfg_scale=0.0, guidance="acfg:0.5").check()


def test_prompt_span_counts_each_rows_own_prompt_tokens():
    prompt_index = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    for start, stop in [(0, -2), (-2, None), (1, 3), (None, 1), (5, 9)]:
        got = PromptSpan(start, stop).masked(prompt_index)
        for row in range(2):
            cols = [j for j in range(8) if prompt_index[row, j]]
            assert got[row].nonzero().flatten().tolist() == span_columns(cols, start, stop)


def test_an_idle_row_gets_the_conditional_logits_themselves():
    """Weight 0 (outside the interval) is no guidance: cond itself, not uncond + 1 · (cond − uncond),
    which rounds differently (checked on these very numbers); the other row is mixed as the formula says."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 50, generator=g), torch.randn(2, 3, 50, generator=g) * 100
    form = Guidance.parse("interval:0.5:1")
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    assert form.idle(1.0, t).tolist() == [True, False] and Guidance.parse("constant").idle(1.0, t) is None
    assert not form.all_idle(1.0, t) and form.all_idle(1.0, torch.tensor([0.1, 0.2], dtype=torch.float64))
    assert not Guidance.parse("constant").all_idle(1.0, t)
    assert form.scheduled and Guidance.parse("linear").scheduled and not Guidance.parse("acfg:0.5").scheduled
    before = cond.clone(), uncond.clone()
    mixed = form.mix(cond, uncond, 1.0, t)
    assert torch.equal(mixed[0], cond[0]) and not torch.equal(uncond[0] + (cond[0] - uncond[0]), cond[0])
    assert torch.equal(mixed[1], uncond[1] + 2.0 * (cond[1] - uncond[1]))
    assert torch.equal(cond, before[0]) and torch.equal(uncond, before[1])   # idle rows copied, inputs unwritten
    assert torch.equal(form.mix(cond, uncond, 1.0, torch.tensor([0.1, 0.2], dtype=torch.float64)), cond)
    skipped = Guidance.parse("interval:0.5:1,norm").step(cond, None, 1.0, t)
    assert skipped.logits is cond and skipped.rate is cond


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_in_place_mix_is_the_seeds_expression_bit_for_bit(dtype):
    """`mix_guidance` and the scheduled `Guidance.mix` compute in place (`amplified`); the bits must
    stay those of uncond + (w + 1) * (cond - uncond), the seed's expression, for every w and dtype."""
    g = torch.Generator().manual_seed(1)
    cond = (torch.randn(4, 16, 300, generator=g) * 7).to(dtype)
    uncond = (torch.randn(4, 16, 300, generator=g) * 7).to(dtype)
    before = cond.clone(), uncond.clone()
    for w in (0.3, 0.5, 1.0, 1.7, 2.0, 3.14159):
        assert torch.equal(mix_guidance(cond, uncond, w), uncond + (w + 1) * (cond - uncond))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    gain = (Guidance.parse("linear").weights(1.7, t).double() + 1).to(dtype).view(-1, 1, 1)
    assert torch.equal(Guidance.parse("linear").mix(cond, uncond, 1.7, t), uncond + gain * (cond - uncond))
    assert torch.equal(cond, before[0]) and torch.equal(uncond, before[1])   # the inputs are not written


def test_low_confidence_remasks_the_ceiling_of_ratio_lowest():
    confidence = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8]])
    committed = torch.tensor([[True, True, False, True, True]])
    assert LowConfidence(0.5).masked_generated(confidence, committed).tolist() == [[False, True, False, True, False]]
    assert LowConfidence(0.2).masked_generated(confidence, committed).tolist() == [[False, True, False, False, False]]


# ---- the LLaDA sampler ----

FORMS = [  # (spec, schedule, span, acfg)
    ("linear", "linear", None, None),
    ("interval:0.25:0.75", "interval:0.25:0.75", None, None),
    ("span:0:-3", "constant", (0, -3), None),
    ("linear,span:-4:", "linear", (-4, None), None),
    ("acfg:0.5", "constant", None, 0.5),
    ("acfg:1,linear", "linear", None, 1.0),
]


@pytest.mark.parametrize("spec,schedule,span,acfg", FORMS)
@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 8, 8), (8, 16, 4), (6, 12, 6)])
def test_llada_forms_token_identical_to_plain_reference(dense, spec, schedule, span, acfg, steps, gen_length,
                                                        block_length):
    prompt = torch.randint(0, 380, (1, 9), generator=torch.Generator().manual_seed(steps + gen_length))
    for w in (0.5, 2.0):
        out = unmask.generate(dense, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                              cfg_scale=w, guidance=spec, mask_id=MASK)
        ref = plain_guided(dense, prompt, steps, gen_length, block_length, w, schedule, span, acfg)
        assert torch.equal(out, ref), (spec, w)


def test_default_form_is_the_seed_guidance(dense):
    prompt = torch.randint(0, 380, (1, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, mask_id=MASK)
    assert torch.equal(unmask.generate(dense, prompt, guidance="constant,prompt", **kw),
                       plain_guided(dense, prompt, 8, 16, 8, 1.0))


@pytest.mark.parametrize("spec", ["linear", "span:1:-2", "interval:0:0.5,span:-3:"])
def test_llada_batched_rows_equal_rows_alone(dense, spec):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 380, (n,), generator=g).tolist() for n in (5, 9, 7)]
    ids, attention = left_pad(prompts, pad_id=381)
    kw = dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5, guidance=spec, mask_id=MASK)
    batched = unmask.generate(dense, ids, attention_mask=attention, **kw)
    for row, p in enumerate(prompts):
        alone = unmask.generate(dense, torch.tensor([p]), **kw)
        assert batched[row, -16:].tolist() == alone[0, -16:].tolist()


def test_same_rows_compares_tokens_and_attention_mask():
    x = torch.full((3, 6), MASK)
    assert same_rows(x, None) and same_rows(x, torch.ones(3, 6))
    assert not same_rows(x, torch.tensor([[1] * 6, [1] * 6, [0] + [1] * 5]))
    x[2, 0] = 7
    assert not same_rows(x, None)


@pytest.mark.parametrize("mode", [dict(), dict(cache="dual"), dict(cache="dual", reuse_uncond=True)])
def test_identical_unconditional_canvases_run_once(dense, mode, monkeypatch):
    """Three prompts of one length masked whole are one canvas of masks: the first pass runs 3 + 1
    rows, and its logits, cache and so every token equal those of the doubled batch."""
    prompt = torch.randint(0, 380, (3, 6), generator=torch.Generator().manual_seed(8))
    kw = dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5, mask_id=MASK, **mode)
    sizes, hook = batch_sizes(dense)
    try:
        shared = unmask.generate(dense, prompt, **kw)
    finally:
        hook.remove()
    assert sizes[0] == 4 and max(sizes) == 6
    monkeypatch.setattr(guidance_module, "same_rows", lambda *a: False)
    sizes, hook = batch_sizes(dense)
    try:
        assert torch.equal(shared, unmask.generate(dense, prompt, **kw))
    finally:
        hook.remove()
    assert sizes[0] == 6


def test_a_shared_unconditional_pass_fills_the_cache_of_the_doubled_batch(dense):
    prompt = torch.randint(0, 380, (3, 6), generator=torch.Generator().manual_seed(8))
    x = torch.cat([prompt, torch.full((3, 16), MASK)], 1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :6] = True
    doubled = KVCache(dense.config.n_layers)
    # a filled cache is never shared into: this pass runs all six rows
    branch_logits(dense, x, prompt_index, MASK, None, slice(6, 14), doubled, slice(0, 22))
    expected = branch_logits(dense, x, prompt_index, MASK, None, slice(6, 14), doubled, slice(0, 22))
    shared = KVCache(dense.config.n_layers)
    got = branch_logits(dense, x, prompt_index, MASK, None, slice(6, 14), shared, slice(0, 22))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(shared.keys + shared.values, doubled.keys + doubled.values))


@pytest.mark.parametrize("spec", ["acfg:0.5", "acfg:0.3,linear"])
def test_acfg_batched_rows_equal_rows_alone(spec):
    """On the bundled (trained) model: the tiny random model's confidences are near-uniform, so which
    committed token is least confident is decided at the 1e-8 level, below batched-vs-alone rounding."""
    model, tok = unmask.load(None)
    prompts = [tok(t)["input_ids"] for t in ("The capital of", "Question: Where does Mara Quell live? Answer:",
                                             "Ilo Brant works as a")]
    ids, attention = left_pad(prompts, pad_id=tok.pad_token_id)
    kw = dict(steps=16, gen_length=16, block_length=8, cfg_scale=1.5, guidance=spec)
    batched = unmask.generate(model, ids, attention_mask=attention, **kw)
    for row, p in enumerate(prompts):
        assert batched[row, -16:].tolist() == unmask.generate(model, torch.tensor([p]), **kw)[0, -16:].tolist()


@pytest.mark.parametrize("spec", ["linear", "span:0:-3", "interval:0.3:1,span:-4:"])
@pytest.mark.parametrize("reuse", [False, True])
def test_cache_refreshed_every_step_equals_no_cache(dense, spec, reuse):
    """A dual cache refreshed at every step recomputes the whole canvas, so a form (its schedule read
    at every step, its canvas in the cache's unconditional rows or in the kept logits) gives the
    uncached tokens."""
    prompt = torch.randint(0, 380, (2, 8), generator=torch.Generator().manual_seed(4))
    kw = dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, guidance=spec, mask_id=MASK)
    cached = unmask.generate(dense, prompt, cache="dual", cache_refresh=1, reuse_uncond=reuse, **kw)
    assert torch.equal(cached, unmask.generate(dense, prompt, **kw))


def batch_sizes(model) -> tuple[list[int], object]:
    """Record the batch size of every forward pass of `model`; returns (sizes, hook handle)."""
    sizes: list[int] = []

    def record(module, args, kwargs):
        sizes.append((args[0] if args else kwargs["input_ids"]).shape[0])

    return sizes, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("cache", [None, "dual", "prefix"])
def test_an_idle_schedule_is_exactly_unguided_and_runs_no_unconditional_rows(dense, cache):
    """interval:1:1 never guides (t < 1 while anything is masked): the tokens are the unguided
    sampler's, and the unconditional rows run only where a cache must be filled (its refreshes)."""
    prompt = torch.randint(0, 380, (2, 8), generator=torch.Generator().manual_seed(6))
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK, cache=cache)
    sizes, hook = batch_sizes(dense)
    try:
        idle = unmask.generate(dense, prompt, cfg_scale=2.0, guidance="interval:1:1", **kw)
    finally:
        hook.remove()
    assert torch.equal(idle, unmask.generate(dense, prompt, **kw))
    refreshes = 0 if cache is None else 2   # one per block; its unconditional rows may run as one (shared)
    assert sum(s > 2 for s in sizes) == refreshes and sizes.count(2) == 8 - refreshes   # 8 steps in all


@pytest.mark.parametrize("cache", [None, "dual"])
def test_interval_guidance_skips_the_unconditional_rows_outside_its_interval(dense, cache, monkeypatch):
    """interval:0.5:1 over two blocks: the first block's steps (t < 0.5) run the conditional rows
    alone, the second block's both; the tokens equal the plain reference (uncached) or a run in
    which the unconditional rows always run (cached: `skip_idle=False`, as under a CUDA graph), and
    the row stepper's."""
    import importlib

    from unmask.sampling.rows import Row, step

    sampler = importlib.import_module("unmask.sampling.generate")

    prompt = torch.randint(0, 380, (2, 8), generator=torch.Generator().manual_seed(7))
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK, cache=cache, cfg_scale=1.5,
              guidance="interval:0.5:1")
    sizes, hook = batch_sizes(dense)
    try:
        out = unmask.generate(dense, prompt, **kw)
    finally:
        hook.remove()
    first_block = sizes[:4] if cache is None else sizes[1:4]   # a cache's first step is its refresh (both)
    assert set(first_block) == {2} and set(sizes[-4:]) == {4}
    if cache is None:
        for r in range(2):
            assert torch.equal(out[r:r + 1], plain_guided(dense, prompt[r:r + 1], 8, 16, 8, 1.5, "interval:0.5:1"))
    else:
        real = sampler.cached_logits
        monkeypatch.setattr(sampler, "cached_logits", lambda *a, **k: real(*a, **{**k, "skip_idle": False}))
        assert torch.equal(out, unmask.generate(dense, prompt, **kw))   # the same run with nothing skipped
        monkeypatch.undo()
    options = SamplerOptions(**{k: v for k, v in kw.items() if k != "mask_id"}).check()
    for r in range(2):
        row = Row.start(prompt[r].tolist(), options, mask_id=MASK)
        while not row.done:
            step(dense, [row])
        assert torch.equal(row.x, out[r])


@pytest.mark.parametrize("spec", ["linear", "span:0:-3", "acfg:0.7"])
def test_forms_run_with_threshold_decoding(dense, spec):
    prompt = torch.randint(0, 380, (2, 8), generator=torch.Generator().manual_seed(5))
    out = unmask.generate(dense, prompt, gen_length=16, block_length=8, threshold=0.2, cfg_scale=1.0, guidance=spec,
                          mask_id=MASK, return_dict_in_generate=True)
    assert not (out.sequences[:, 8:] == MASK).any() and out.steps <= 16


@pytest.mark.parametrize("spec,schedule,span", [("norm", "constant", None), ("linear,span:0:-3,norm", "linear", (0, -3))])
@pytest.mark.parametrize("threshold", [None, 0.02])
def test_normalized_forms_token_identical_to_plain_reference(dense, spec, schedule, span, threshold):
    """Rojas et al.'s normalisation: positions ranked (and, with a threshold, counted) by the
    conditional model's confidence, tokens from the guided logits; with and without a cache
    refreshed every step."""
    prompt = torch.randint(0, 380, (1, 9), generator=torch.Generator().manual_seed(12))
    for w in (1.0, 3.0):
        ref = plain_guided(dense, prompt, 8, 16, 8, w, schedule, span, norm=True, threshold=threshold)
        for cache in (None, "dual"):
            out = unmask.generate(dense, prompt, steps=8, gen_length=16, block_length=8, cfg_scale=w, guidance=spec,
                                  threshold=threshold, cache=cache, cache_refresh=1, mask_id=MASK)
            assert torch.equal(out, ref), (spec, w, cache)
    assert not torch.equal(ref, plain_guided(dense, prompt, 8, 16, 8, 3.0, schedule, span, threshold=threshold))


def test_normalized_threshold_decoding_unmasks_at_the_unguided_rate(dense):
    """With a threshold, the steps a normalised form takes are those of unguided decoding's
    confidences; plain guidance sharpens them and commits more per step (Rojas et al.'s effect)."""
    prompt = torch.randint(0, 380, (3, 9), generator=torch.Generator().manual_seed(13))
    kw = dict(gen_length=32, block_length=32, threshold=0.02, mask_id=MASK, return_dict_in_generate=True)
    steps = {spec: unmask.generate(dense, prompt, cfg_scale=4.0, guidance=spec, **kw).steps
             for spec in ("constant", "norm")}
    assert steps["constant"] < steps["norm"]


def test_a_form_changes_the_text_only_through_guidance(dense):
    """w = 0 turns every form off; at w > 0 the forms differ from one another on this prompt."""
    prompt = torch.randint(0, 380, (1, 9), generator=torch.Generator().manual_seed(6))
    kw = dict(steps=16, gen_length=16, block_length=16, mask_id=MASK)
    plain = unmask.generate(dense, prompt, **kw)
    outs = {spec: unmask.generate(dense, prompt, cfg_scale=3.0, guidance=spec, **kw)
            for spec in ("constant", "span:0:2", "acfg:0.5")}
    for spec in outs:
        assert torch.equal(unmask.generate(dense, prompt, cfg_scale=0.0, guidance=spec, **kw), plain)
    assert len({tuple(o[0].tolist()) for o in outs.values()}) > 1


@pytest.mark.parametrize("cache", [None, "dual"])
def test_only_a_schedule_reads_the_clock_in_generate(dense, clock_reads, cache):
    """The unmasked fraction t is computed only for a form whose weight depends on it; the constant
    form's tokens are the seed's either way (the plain reference)."""
    calls = clock_reads("unmask.sampling.generate")
    prompt = torch.randint(0, 200, (1, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(steps=8, gen_length=8, block_length=4, cfg_scale=1.0, cache=cache)
    out = unmask.generate(dense, prompt, guidance="constant", **kw)
    assert calls == []
    if cache is None:
        assert out.tolist() == plain_guided(dense, prompt, 8, 8, 4, 1.0).tolist()
    unmask.generate(dense, prompt, guidance="linear", **kw)
    assert len(calls) == 8


# ---- block diffusion (LLaDA2.x) ----

@pytest.mark.parametrize("spec,schedule,span", [("linear", "linear", None), ("span:0:-2", "constant", (0, -2)),
                                                ("interval:0.2:0.6,span:-3:", "interval:0.2:0.6", (-3, None))])
def test_block_forms_token_identical_to_plain_reference(llada2, spec, schedule, span):
    mask_id = llada2.config.mask_token_id
    prompt = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(7))
    for cache in (False, True):
        out = block_generate(llada2, prompt, gen_length=12, block_length=4, steps=4, threshold=None, cfg_scale=1.5,
                             guidance=spec, cache=cache)
        ref = plain_block_guided(llada2, prompt, 12, 4, 4, 1.5, schedule, span, mask_id=mask_id)
        assert out[0, :ref.shape[1]].tolist() == ref[0].tolist()


@pytest.mark.parametrize("cache", [False, True])
def test_block_interval_guidance_runs_no_unconditional_rows_at_idle_steps(llada2, cache):
    """interval:0.5:1 over three blocks of 4: the first block's steps (t < 0.5) run the conditional
    rows alone, later ones both, and the uncond branch's cache catches up over the blocks it missed;
    the tokens are the plain reference's, which computes both branches at every step."""
    mask_id = llada2.config.mask_token_id
    prompt = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(7))
    written = [0]   # generated tokens after each step
    sizes, hook = batch_sizes(llada2)
    try:
        out = block_generate(llada2, prompt, gen_length=12, block_length=4, steps=4, threshold=None, cfg_scale=1.5,
                             guidance="interval:0.5:1", cache=cache, return_dict_in_generate=True,
                             callback=lambda s: written.append(int((s.x[0, 6:] != mask_id).sum())))
    finally:
        hook.remove()
    ref = plain_block_guided(llada2, prompt, 12, 4, 4, 1.5, "interval:0.5:1", None, mask_id=mask_id)
    assert out.sequences[0, :ref.shape[1]].tolist() == ref[0].tolist()
    guided_steps = sum(n / 12 >= 0.5 for n in written[:out.steps])   # t before each step in [0.5, 1]
    assert 0 < guided_steps < out.steps and len(sizes) == out.steps + guided_steps


def test_block_unconditional_canvases_of_any_prompts_run_once(llada2, monkeypatch):
    """Left-aligned and masked whole, prompts of any lengths are one canvas of masks: the first
    unconditional pass runs one row for three, with and without the cache, and the tokens equal
    those of a run that computes every row."""
    import importlib

    blocks = importlib.import_module("unmask.sampling.blocks")
    prompts = [[5, 17, 99, 42, 7, 160, 3], [11, 12, 13, 14, 15], [40, 41, 42, 43, 44, 45]]   # all end in block 1
    ids, attention = left_pad(prompts, pad_id=0)
    for cache in (False, True):
        kw = dict(attention_mask=attention, gen_length=8, block_length=4, steps=4, threshold=None, cfg_scale=1.5,
                  cache=cache)
        sizes, hook = batch_sizes(llada2)
        try:
            shared = block_generate(llada2, ids, **kw)
        finally:
            hook.remove()
        assert sizes[:2] == [3, 1]   # the conditional rows, then their one unconditional canvas
        with monkeypatch.context() as m:
            m.setattr(blocks, "same_rows", lambda *a: False)
            sizes, hook = batch_sizes(llada2)
            try:
                assert torch.equal(shared, block_generate(llada2, ids, **kw))
            finally:
                hook.remove()
        assert sizes[:2] == [3, 3]


def test_only_a_schedule_reads_the_clock_in_block_generate(llada2, clock_reads):
    calls = clock_reads("unmask.sampling.blocks")
    prompt = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(7))
    for cache in (False, True):
        kw = dict(gen_length=8, block_length=4, steps=4, threshold=None, cfg_scale=1.5, cache=cache)
        block_generate(llada2, prompt, guidance="span:0:-2", **kw)
        assert calls == []
        block_generate(llada2, prompt, guidance="linear", **kw)
        assert calls and calls.clear() is None


def test_block_normalized_form_token_identical_to_plain_reference(llada2):
    mask_id = llada2.config.mask_token_id
    prompt = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(14))
    ref = plain_block_guided(llada2, prompt, 12, 4, 4, 3.0, "linear", None, mask_id=mask_id, norm=True)
    for cache in (False, True):
        out = block_generate(llada2, prompt, gen_length=12, block_length=4, steps=4, threshold=None, cfg_scale=3.0,
                             guidance="linear,norm", cache=cache)
        assert out[0, :ref.shape[1]].tolist() == ref[0].tolist()
    assert not torch.equal(ref, plain_block_guided(llada2, prompt, 12, 4, 4, 3.0, "linear", None, mask_id=mask_id))


def test_block_batched_rows_equal_rows_alone(llada2):
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (3, 6)]
    ids, attention = left_pad(prompts, pad_id=0)
    kw = dict(gen_length=8, block_length=4, steps=4, threshold=None, cfg_scale=1.0, guidance="linear,span:-2:")
    batched = block_generate(llada2, ids, attention_mask=attention, **kw)
    for row, p in enumerate(prompts):
        assert batched[row, -8:].tolist() == block_generate(llada2, torch.tensor([p]), **kw)[0, -8:].tolist()


# ---- likelihood: schedules, spans, PMI ----

@torch.no_grad()
def plain_exact_bound(model, context, continuation, w, schedule="constant", span=None, pmi=False):
    """The exact bound, Σ over mask patterns S of 1/(C(L,|S|)·|S|) Σ_{i∈S} log p_guided(r_i), written plainly."""
    P, L = len(context), len(continuation)
    masked_cols = span_columns(list(range(P)), *(span or (None, None)))
    total = 0.0
    for pattern in range(1, 2 ** L):
        S = [i for i in range(L) if pattern >> i & 1]
        x = torch.tensor([context + [MASK if i in S else r for i, r in enumerate(continuation)]])
        un = x.clone()
        for j in masked_cols:
            un[0, j] = MASK
        cond, uncond = model(x).logits[0].float(), model(un).logits[0].float()
        w_t = w * schedule_factor(schedule, 1 - len(S) / L)
        if pmi:
            lc, lu = cond.log_softmax(-1), uncond.log_softmax(-1)
            term = sum(float(lc[P + i, continuation[i]] - lu[P + i, continuation[i]]) for i in S)
        else:
            logp = (uncond + (w_t + 1) * (cond - uncond)).log_softmax(-1) if w_t > 0 else cond.log_softmax(-1)
            term = sum(float(logp[P + i, continuation[i]]) for i in S)
        total += term / (math.comb(L, len(S)) * len(S))
    return total


@pytest.mark.parametrize("spec,schedule,span", [("linear", "linear", None), ("span:1:-1", "constant", (1, -1)),
                                                ("interval:0.4:1,span:-2:", "interval:0.4:1", (-2, None))])
def test_scoring_forms_match_the_plain_exact_bound(dense, spec, schedule, span):
    g = torch.Generator().manual_seed(9)
    context = torch.randint(0, 380, (6,), generator=g).tolist()
    continuation = torch.randint(0, 380, (3,), generator=g).tolist()
    got = score_requests(dense, [Request(context, continuation)], cfg_scales=[0.0, 1.5, PMI], mode="exact",
                         guidance=spec, mask_id=MASK)[0]
    assert got[0].value == pytest.approx(plain_exact_bound(dense, context, continuation, 0.0), abs=1e-4)
    assert got[1].value == pytest.approx(plain_exact_bound(dense, context, continuation, 1.5, schedule, span), abs=1e-4)
    assert got[2].value == pytest.approx(plain_exact_bound(dense, context, continuation, 0.0, span=span, pmi=True),
                                         abs=1e-4)


def test_pmi_is_the_difference_of_the_two_bounds_per_sample(dense):
    """PMI on Monte Carlo draws: cond bound minus uncond bound on the same draws, batched with other
    requests (left padding changes nothing)."""
    g = torch.Generator().manual_seed(10)
    requests = [Request(torch.randint(0, 380, (n,), generator=g).tolist(),
                        torch.randint(0, 380, (6,), generator=g).tolist(), seed=n) for n in (4, 7)]
    both = score_requests(dense, requests, cfg_scales=[0.0, PMI], mc_num=8, batch_size=8, mask_id=MASK)
    alone = score_requests(dense, requests[1:], cfg_scales=[PMI], mc_num=8, batch_size=8, mask_id=MASK)
    assert both[1][1].value == pytest.approx(alone[0][0].value, abs=1e-4)
    assert both[0][1].n == 8 and both[0][1].stderr > 0


def test_scoring_refuses_a_pmi_typo_and_acfg(dense):
    with pytest.raises(ValueError, match="cfg_scale"):
        score_requests(dense, [Request([1, 2], [3])], cfg_scales=["pmj"], mask_id=MASK)
    with pytest.raises(OptionError, match="scoring has none"):
        score_requests(dense, [Request([1, 2], [3])], cfg_scales=[1.0], guidance="acfg:0.5", mask_id=MASK)
    with pytest.raises(OptionError, match="drop 'norm'"):
        score_requests(dense, [Request([1, 2], [3])], cfg_scales=[1.0], guidance="norm", mask_id=MASK)


# ---- entry points: the form travels through the shared options ----

def test_cli_generate_guidance_flag(tiny_checkpoint, capsys):
    from unmask.cli import main
    from unmask.sampling.text import generate_text

    args = ["--gen-length", "16", "--block-length", "8", "--cfg-scale", "1", "--guidance", "linear,span:0:-2"]
    assert main(["generate", "hello there", "--model", str(tiny_checkpoint), *args]) == 0
    model, tok = unmask.load(tiny_checkpoint)
    expected = generate_text(model, tok, ["hello there"], steps=16, gen_length=16, block_length=8, cfg_scale=1.0,
                             guidance="linear,span:0:-2")[0]
    assert capsys.readouterr().out == "hello there" + expected + "\n"
    assert main(["generate", "x", "--model", str(tiny_checkpoint), "--cfg-scale", "1", "--guidance", "cosine"]) == 2
    assert "unknown guidance part 'cosine'" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tiny_checkpoint), "--cfg-scale", "1", "--guidance", "acfg:0.5",
                 "--cache", "dual"]) == 2
    assert "cache=None with acfg" in capsys.readouterr().err


def test_server_guidance_field_and_default(tiny_checkpoint):
    import httpx
    from serve_fixtures import live_server
    from unmask.sampling.text import generate_text
    from unmask.serve import ServeConfig, create_app

    model, tok = unmask.load(tiny_checkpoint)
    config = ServeConfig(model_name="tiny", default_max_tokens=16, guidance="linear")
    messages = [{"role": "user", "content": "hi"}]
    with live_server(create_app(model, tok, config)) as url:
        for field in ("span:0:-3", None):
            body = {"model": "tiny", "messages": messages, "max_tokens": 16, "block_length": 16, "cfg_scale": 1.0}
            body |= {} if field is None else {"guidance": field}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            [expected] = generate_text(model, tok, [messages], chat=True, steps=16, gen_length=16, block_length=16,
                                       cfg_scale=1.0, guidance=field or "linear")
            assert r.json()["choices"][0]["message"]["content"] == expected
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": messages, "guidance": "span:x:1", "cfg_scale": 1.0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guidance"
    with pytest.raises(ValueError, match="--guidance: unknown guidance part"):
        ServeConfig(guidance="nope").check()


def test_harness_guidance_argument(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from test_eval import make_tiny_checkpoint
    from unmask.eval.encoding import encode_pair
    from unmask.harness import UnmaskLM

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-harness"))
    lm = UnmaskLM(model=str(ckpt), cfg_scale=1.0, guidance="span:-2:", mc_num=4, batch_size=8, check_greedy=False)
    ctx, cont = "Question: Who is it?\nAnswer:", " Tom"
    [(value, _)] = lm.loglikelihood([SimpleNamespace(args=(ctx, cont))], disable_tqdm=True)
    c, r = encode_pair(lm.tokenizer, ctx, cont, lm.max_len)
    [[est]] = score_requests(lm.model, [Request(c, r, 0)], cfg_scales=[1.0], mc_num=4, batch_size=8,
                             guidance="span:-2:")
    [[plain]] = score_requests(lm.model, [Request(c, r, 0)], cfg_scales=[1.0], mc_num=4, batch_size=8)
    assert value == pytest.approx(est.value) and value != pytest.approx(plain.value)
    with pytest.raises(OptionError, match="scoring has none"):
        UnmaskLM(model=str(ckpt), cfg_scale=1.0, guidance="acfg:0.5")


def test_bench_cfg_modes_take_the_form():
    from unmask.bench import BenchConfig, mode_options

    schedule = dict(steps=8, gen_length=8, block_length=8)
    assert mode_options("dual+cfg", 1.0, schedule, guidance="linear").guidance == "linear,prompt"
    assert mode_options("dual", 1.0, schedule, guidance="linear").cfg_scale == 0.0
    with pytest.raises(ValueError, match="mode 'dual\\+cfg'.*cache=None with acfg"):
        BenchConfig(modes=["dual+cfg"], guidance="acfg:0.5").check("cpu")
    BenchConfig(modes=["dual", "exact+cfg"], guidance="acfg:0.5").check("cpu")


def test_eval_pmi_column_and_guidance(tmp_path):
    import json

    from test_eval import TASK_DIR, make_tiny_checkpoint
    from unmask.cli import main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["eval", "--model", str(ckpt), "--data-dir", str(TASK_DIR), "--tasks", "arc_easy,lambada",
                 "--limit", "3", "--mc-num", "4", "--pmi", "--guidance", "span:-4:", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    arc, lambada = data["results"]
    assert arc["columns"] == ["w=0", "w=1", "pmi"] and len(arc["paired"]["acc"]) == 2
    assert lambada["columns"] == ["w=0", "w=1"]          # a cloze task is judged by the sampler: no PMI column
    table = (out / "results.md").read_text()
    assert data["meta"]["guidance"] == "span:-4:" and "Δ pmi" in table
    lambada_row = next(line for line in table.splitlines() if line.startswith("| lambada | acc |"))
    assert lambada_row.count("|") == table.splitlines()[0].count("|") and lambada_row.count("| – |") == 2
    assert main(["eval", "--model", str(ckpt), "--pmi", "--cfg-scale", "auto"]) == 2
    assert main(["eval", "--model", str(ckpt), "--guidance", "acfg:0.3"]) == 2


def test_acfg_counts_its_two_sequential_passes(dense):
    prompt = torch.randint(0, 380, (1, 6), generator=torch.Generator().manual_seed(11))
    kw = dict(steps=8, gen_length=8, block_length=8, cfg_scale=1.0, mask_id=MASK, return_dict_in_generate=True)
    assert unmask.generate(dense, prompt, guidance="acfg:0.5", **kw).forward_passes == 16
    assert unmask.generate(dense, prompt, guidance="span:0:2", **kw).forward_passes == 8
