"""The likelihood bound: MC vs exact enumeration, spread, chain rule, greedy check, batching, windows."""

from pathlib import Path

import pytest
import torch

from unmask.likelihood import (Request, chain_rule_loglikelihood, document_bound, exact_bound, greedy_checks,
                               mc_loglikelihood, rolling_windows, score_requests)
from unmask.models import load_model
from unmask.sampling import generate, mix_guidance

CKPT = Path(__file__).parent / "data" / "llada-dense-tiny"
MASK = 383
CTX, CONT = [5, 17, 42, 99, 3, 7], [11, 250, 37]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model(CKPT)


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_mc_converges_to_exact_bound(model, w):
    exact = exact_bound(model, CTX, CONT, cfg_scale=w)
    mc = mc_loglikelihood(model, CTX, CONT, mc_num=1024, batch_size=64, cfg_scale=w, seed=3)
    assert exact.stderr == 0 and mc.n == 1024
    assert abs(mc.value - exact.value) < 4 * mc.stderr
    assert mc.stderr < 0.05 * abs(exact.value)


def test_mc_spread_falls_as_one_over_sqrt_n(model):
    def spread(n):
        values = torch.tensor([mc_loglikelihood(model, CTX, CONT + [8], mc_num=n, batch_size=8, seed=s).value
                               for s in range(12)])
        return float(values.std())

    ratio = spread(8) / spread(128)          # sqrt(128 / 8) = 4
    assert 2.0 < ratio < 8.0


@torch.no_grad()
def _hand_chain(model, ctx, cont, w):
    total = 0.0
    for i in range(len(cont)):
        x = torch.tensor([ctx + cont[:i] + [MASK] * (len(cont) - i)])
        logits = model(x).logits[0, len(ctx) + i]
        if w > 0:
            uncond = x.clone()
            uncond[0, :len(ctx)] = MASK
            logits = mix_guidance(logits, model(uncond).logits[0, len(ctx) + i], w)
        total += float(logits.log_softmax(-1)[cont[i]])
    return total


@pytest.mark.parametrize("w", [0.0, 0.7])
def test_chain_rule_equals_left_to_right_sum(model, w):
    got = chain_rule_loglikelihood(model, CTX, CONT, cfg_scale=w)
    assert got.value == pytest.approx(_hand_chain(model, CTX, CONT, w), abs=1e-4)


def test_one_token_bound_is_exact_conditional(model):
    assert exact_bound(model, CTX, CONT[:1]).value == pytest.approx(_hand_chain(model, CTX, CONT[:1], 0.0), abs=1e-4)


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_greedy_checks_agree_with_generate_in_mixed_batches(model, w):
    def produced(ctx, L):
        out = generate(model, torch.tensor([ctx]), steps=L, gen_length=L, block_length=L, cfg_scale=w)
        return out[0, len(ctx):].tolist()

    right = [Request(CTX, produced(CTX, 3)), Request(CTX[:2], produced(CTX[:2], 3)), Request(CTX[1:], produced(CTX[1:], 2))]
    wrong = [Request(r.context, r.continuation[:-1] + [(r.continuation[-1] + 1) % MASK]) for r in right]
    checks = greedy_checks(model, right + wrong + [Request(CTX, [])], cfg_scale=w, batch_size=2)
    assert checks == [True] * 3 + [False] * 3 + [True]


def test_batched_scales_and_padding_match_single_requests(model):
    reqs = [Request(CTX, CONT, seed=1), Request(CTX[:2], CONT[:2] + [9, 10, 12], seed=2), Request([], [4, 5])]
    batched = score_requests(model, reqs, cfg_scales=[0.0, 2.0], mc_num=16, batch_size=40)
    for i, r in enumerate(reqs):
        for s, w in enumerate([0.0, 2.0]):
            [[alone]] = score_requests(model, [r], cfg_scales=[w], mc_num=16, batch_size=40)
            assert batched[i][s].value == pytest.approx(alone.value, abs=1e-4)
    # few mask patterns (2^3 - 1 <= 16): enumerated, so exact and without variance
    assert batched[0][0].value == pytest.approx(exact_bound(model, CTX, CONT).value, abs=1e-5)
    assert batched[0][0].stderr == 0
    # a 5-token continuation (31 patterns > 16) is estimated by Monte Carlo
    assert batched[1][0].n == 16 and batched[1][0].stderr > 0
    # no context: guidance has nothing to remove
    assert batched[2][1].value == pytest.approx(batched[2][0].value, abs=1e-5)


def test_rolling_windows_cover_each_token_once():
    for n, max_len in [(5, 8), (8, 8), (9, 8), (1000, 512), (37, 6)]:
        covered = []
        for ctx_start, start, end in rolling_windows(n, max_len):
            assert 0 <= ctx_start <= start < end and end - ctx_start <= max_len
            covered += range(start, end)
        assert covered == list(range(n))


def test_document_bound_sums_windows(model):
    ids = [(7 * i) % 380 for i in range(20)]
    whole = document_bound(model, ids, mode="chain", max_len=20)
    assert whole.value == pytest.approx(chain_rule_loglikelihood(model, [], ids).value, abs=1e-3)
    split = document_bound(model, ids, mode="chain", max_len=8)
    expected = sum(chain_rule_loglikelihood(model, ids[c:s], ids[s:e]).value for c, s, e in rolling_windows(20, 8))
    assert split.value == pytest.approx(expected, abs=1e-3)


def test_errors(model):
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        exact_bound(model, CTX, CONT, cfg_scale=-1)
    with pytest.raises(ValueError, match="unknown likelihood mode"):
        score_requests(model, [Request(CTX, CONT)], mode="bogus")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        score_requests(model, [Request([1] * 510, CONT)])


# --- block-diffusion models: the bound block by block under the block-causal mask ---------------

LLADA2 = Path(__file__).parent / "data" / "llada2-moe-tiny"
MASK2 = 511


@pytest.fixture(scope="module")
def llada2():
    return load_model(LLADA2, dtype=torch.float64)


def test_block_spans_cut_at_absolute_boundaries():
    from unmask.likelihood import block_spans

    assert block_spans(5, 10, 4) == [(0, 3), (3, 7), (7, 10)]
    assert block_spans(8, 4, 4) == [(0, 4)]
    assert block_spans(0, 3, 32) == [(0, 3)]


@torch.no_grad()
def _block_logp(model, ids: list[int], b: int) -> torch.Tensor:
    """Log-probabilities of a canvas under the block-causal mask, positions 0.."""
    from unmask.sampling.blocks import block_causal_mask

    mask = block_causal_mask(len(ids), b)[None, None]
    return model(torch.tensor([ids]), attention_mask=mask).logits.log_softmax(-1)[0]


def _hand_block_bound(model, ctx, cont, b, mode):
    """Σ over blocks of the block's exact bound (or chain rule), earlier blocks clean, later masked."""
    import itertools
    import math

    from unmask.likelihood import block_spans

    total = 0.0
    for start, stop in block_spans(len(ctx), len(cont), b):
        Lk = stop - start
        if mode == "chain":
            for i in range(start, stop):
                canvas = ctx + cont[:i] + [MASK2] * (len(cont) - i)
                total += float(_block_logp(model, canvas, b)[len(ctx) + i, cont[i]])
            continue
        for size in range(1, Lk + 1):
            for S in itertools.combinations(range(start, stop), size):
                canvas = ctx + [MASK2 if (i in S or i >= stop) else t for i, t in enumerate(cont)]
                logp = _block_logp(model, canvas, b)
                total += sum(float(logp[len(ctx) + i, cont[i]]) for i in S) / (math.comb(Lk, size) * size)
    return total


@pytest.mark.parametrize("mode", ["exact", "chain"])
def test_block_bound_equals_a_hand_computation(llada2, mode):
    ctx, cont = [5, 17, 42, 99, 3, 7], [11, 250, 37, 8, 90]
    b = 4                                             # continuation positions 6..10: blocks [6, 8) and [8, 11)
    [[est]] = score_requests(llada2, [Request(ctx, cont)], mode=mode, block_length=b)
    assert est.value == pytest.approx(_hand_block_bound(llada2, ctx, cont, b, mode), abs=1e-5)  # scored in float32
    padded = score_requests(llada2, [Request(ctx, cont), Request(ctx[:2], cont[:2] + [6, 6, 6, 6, 6, 6])],
                            mode=mode, block_length=b, batch_size=7)
    assert padded[0][0].value == pytest.approx(est.value, abs=1e-5)   # padding and batch-mates change nothing


def test_block_mc_converges_to_the_block_exact_bound(llada2):
    ctx, cont = [5, 17, 42, 99, 3, 7], [11, 250, 37, 8, 90, 4, 4, 61, 2]   # blocks of 2 (enumerated) and 7 (MC)
    exact = score_requests(llada2, [Request(ctx, cont)], mode="exact", block_length=8)[0][0]
    mc = score_requests(llada2, [Request(ctx, cont, seed=1)], mode="mc", mc_num=64, block_length=8)[0][0]
    assert mc.n == 64 and mc.stderr > 0
    assert abs(mc.value - exact.value) < 4 * mc.stderr


def test_block_guidance_masks_the_context_under_the_same_mask(llada2):
    from unmask.sampling.blocks import block_causal_mask

    ctx, cont, w = [5, 17, 42, 99, 3], [11, 250], 1.5
    [[est]] = score_requests(llada2, [Request(ctx, cont)], mode="chain", cfg_scales=[w], block_length=4)
    mask = block_causal_mask(7, 4)[None, None]
    total = 0.0
    with torch.no_grad():
        for i in range(2):
            canvas = ctx + cont[:i] + [MASK2] * (2 - i)
            cond = llada2(torch.tensor([canvas]), attention_mask=mask).logits
            uncond = llada2(torch.tensor([[MASK2] * 5 + canvas[5:]]), attention_mask=mask).logits
            total += float(mix_guidance(cond, uncond, w).log_softmax(-1)[0, 5 + i, cont[i]])
    assert est.value == pytest.approx(total, abs=1e-5)


def test_block_greedy_checks_agree_with_block_decoding(llada2):
    from unmask.sampling import block_generate

    ctx = [5, 17, 42, 99, 3]
    out = block_generate(llada2, torch.tensor([ctx]), gen_length=32, block_length=32, steps=32, threshold=None,
                         mask_id=MASK2, eos_id=-1)
    produced = out[0, 5:8].tolist()
    wrong = produced[:2] + [(produced[2] + 1) % MASK2]
    assert greedy_checks(llada2, [Request(ctx, produced), Request(ctx, wrong)]) == [True, False]


def test_block_length_is_for_block_models_only(model):
    with pytest.raises(ValueError, match="block-diffusion"):
        score_requests(model, [Request(CTX, CONT)], block_length=4)
