"""Confidence rules: which of the proposed tokens to keep at a step, the rest stay masked.

Each rule scores every proposed token; the sampler commits the highest scores. Scores are
computed from the (guided) logits without temperature or noise, as the reference does.
- low_confidence: the probability of the proposed token (the reference's default).
- margin: top-1 minus top-2 probability (peers' "topk_margin").
- entropy: minus the entropy of the predictive distribution (Dream's "entropy").
- random: U(0, 1), the reference's 'random'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REMASKING_RULES = ("low_confidence", "random", "margin", "entropy")


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, rule: str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Score of each proposed token, (B, T) from logits (B, T, V) and tokens (B, T)."""
    if rule == "random":
        return torch.rand(tokens.shape, device=tokens.device, generator=generator)
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
