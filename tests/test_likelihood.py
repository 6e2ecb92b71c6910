"""The likelihood bound: MC vs exact enumeration, spread, chain rule, greedy check, batching, windows."""

from pathlib import Path

import pytest
import torch

from unmask.likelihood import (Request, chain_rule_loglikelihood, document_bound, exact_bound, greedy_check,
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
def test_greedy_check_agrees_with_generate(model, w):
    out = generate(model, torch.tensor([CTX]), steps=3, gen_length=3, block_length=3, cfg_scale=w)
    produced = out[0, len(CTX):].tolist()
    assert greedy_check(model, CTX, produced, cfg_scale=w)
    wrong = produced[:2] + [(produced[2] + 1) % MASK]
    assert not greedy_check(model, CTX, wrong, cfg_scale=w)


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
