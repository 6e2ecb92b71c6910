"""scripts/prior_term.py: the prior term of each choice, the analysis behind the CFG table."""

import sys
from pathlib import Path

import torch

from test_eval import make_tiny_checkpoint
from unmask.eval.tasks import Item
from unmask.likelihood import Request, score_requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import prior_term  # noqa: E402

import unmask  # noqa: E402


def test_prior_row_counts_what_the_prior_does():
    items = [Item(((("c", " a"),) * 3), gold, (1, 1, 1)) for gold in (0, 1, 2)]
    cond = [[-1.0, -2.0, -3.0], [-1.0, -1.5, -3.0], [-2.0, -1.0, -1.2]]
    prior = [[-3.0, -1.0, -2.0], [-0.5, -2.0, -2.0], [-2.0, -1.0, -2.5]]
    r = prior_term.prior_row(items, cond, prior)
    assert r["n"] == 3 and r["acc"] == 1 / 3            # picks 0, 0, 1; gold 0, 1, 2
    assert r["acc_prior"] == 0                           # prior picks 1, 0, 1
    assert r["acc_pmi"] == 1                             # cond - prior: [2,-1,-1], [-.5,.5,-1], [0,0,1.3]
    assert r["acc_anti_prior"] == 1                      # least prior: 0, 1 (first of the tie), 2
    assert r["errors"] == 2 and r["tilted"] == 2         # both wrong picks have the higher prior
    assert abs(r["prior_gap"] - ((-3 + 1) + (-2 + 0.5) + (-2.5 + 1)) / 3) < 1e-12


def test_separation_is_the_auc_of_the_score_difference():
    cond = [[0.0, 1.0], [0.0, 0.5], [0.0, -1.0], [0.0, 0.5]]      # differences 1, 0.5, -1, 0.5
    assert prior_term.separation(cond, [1, 0, 0, 1]) == (1 + 1 + 1 + 0.5) / 4   # (1 vs 0.5, -1), (0.5 vs 0.5 tie, -1)
    assert prior_term.separation(cond, [0, 1, 1, 0]) == 1 - 3.5 / 4
    assert prior_term.separation(cond, [1, 1, 1, 1]) is None and prior_term.separation([[0, 1, 2]], [0]) is None
    items = [Item((("c", " a"), ("c", " b")), g, (1, 1)) for g in (1, 0, 0, 1)]
    assert prior_term.prior_row(items, cond, [[0.0, 0.0]] * 4)["auc"] == 3.5 / 4


def test_prior_scores_are_the_unconditional_branch(tmp_path):
    """Scoring with the context masked gives what guidance subtracts: mixing cond and prior by hand
    at w equals the scorer's own guided score (one-token continuation)."""
    model, tok = unmask.load(make_tiny_checkpoint(tmp_path / "ckpt"))
    items = [Item((("Question: Which gas?\nAnswer:", " the"), ("Question: Which gas?\nAnswer:", " water")),
                  0, (3, 5))]
    cond, prior = prior_term.choice_scores(model, tok, items)
    from unmask.eval.encoding import encode_pair
    ctx, cont = encode_pair(tok, *items[0].requests[0])
    [[e0, e1]] = score_requests(model, [Request(ctx, cont)], mode="chain", cfg_scales=(0.0, 1.0))
    assert abs(e0.value - cond[0][0]) < 1e-5   # float32, scored in passes of different batch shapes
    assert len(cont) == 1  # " the" is one token of this tokenizer
    mask = model.config.mask_token_id
    with torch.no_grad():
        logits = model(torch.tensor([ctx + [mask], [mask] * (len(ctx) + 1)])).logits[:, -1].float()
    assert abs(float(logits[1].log_softmax(-1)[cont[0]]) - prior[0][0]) < 1e-4
    mixed = (logits[1] + 2 * (logits[0] - logits[1])).log_softmax(-1)[cont[0]]
    assert abs(float(mixed) - e1.value) < 1e-4
