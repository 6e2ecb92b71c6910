"""Confidence rules: which of the proposed tokens to keep at a step, the rest stay masked.

Each rule scores every proposed token; the sampler commits the highest scores. Scores are
computed from the (guided) logits without temperature or noise, as the reference does.
- low_confidence: the probability of the proposed token (the reference's default).
- margin: top-1 minus top-2 probability (peers' "topk_margin").
- entropy: minus the entropy of the predictive distribution (Dream's "entropy").
- random: U(0, 1), the reference's 'random'.

How many to commit comes from the step schedule (the reference) or, for parallel decoding
(Fast-dLLM, Wu et al. 2025), from the scores themselves: `parallel_counts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import vocab_parallel

REMASKING_RULES = ("low_confidence", "random", "margin", "entropy")


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, rule: str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Score of each proposed token, (B, T) from logits (B, T, V) and tokens (B, T)."""
    if rule == "random":
        return torch.rand(tokens.shape, device=tokens.device, generator=generator)
    if vocab_parallel.is_vocab_sharded(logits):
        return vocab_parallel.token_confidence(logits, tokens, rule)
    probs = F.softmax(logits, dim=-1)
    if rule == "low_confidence":
        return torch.gather(probs, -1, tokens.unsqueeze(-1)).squeeze(-1)
    if rule == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if rule == "entropy":
        return (probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1)
    raise ValueError(f"unknown remasking rule {rule!r}: choose one of {', '.join(REMASKING_RULES)}")


def select_top(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): the k[b] highest-confidence positions of each row (−inf never chosen)."""
    k_max = int(k.max())
    chosen = torch.zeros_like(confidence, dtype=torch.bool)
    if k_max == 0:
        return chosen
    top = confidence.topk(k_max, dim=-1).indices
    keep = torch.arange(k_max, device=k.device).view(1, -1) < k.view(-1, 1)
    chosen.scatter_(1, top, keep)
    return chosen & (confidence > float("-inf"))


def parallel_counts(confidence: torch.Tensor, threshold: float | None = None,
                    factor: float | None = None) -> torch.Tensor:
    """(B,) how many positions to commit this step with parallel decoding; always at least one.

    confidence (B, W) holds −inf where nothing can be committed. Exactly one of:
    threshold τ: every position scoring ≥ τ (Fast-dLLM's threshold rule).
    factor f: the largest n with (n + 1)(1 − c_n) < f, c_n the n-th highest score (Fast-dLLM's
      factor rule: if every committed marginal is within ε of 1, greedy parallel decoding matches
      sequential decoding when (n + 1)ε ≤ 1; f relaxes that bound). Scores are sorted descending,
      so (n + 1)(1 − c_n) never decreases with n and the n that satisfy it form a prefix: counting
      them gives the largest n.
    The scores are those of the remasking rule, so τ is a probability for 'low_confidence' and
    'margin' but a negative entropy (≤ 0) for 'entropy'.
    """
    if threshold is not None:
        n = (confidence >= threshold).sum(-1)
    else:
        ranked = confidence.float().sort(-1, descending=True).values
        n_plus_1 = torch.arange(2, ranked.shape[-1] + 2, device=ranked.device)
        n = (n_plus_1 * (1 - ranked) < factor).sum(-1)
    return n.clamp_min(1)
