"""Proposing tokens: argmax at temperature 0, exact sampling from softmax(logits / T) above it.

Gumbel-max in float64: argmax(logits − T·log(−log U)) = argmax(exp(logits) / (−log U)^T), the
reference's form, computed in log space so large logits cannot overflow exp().
"""

from __future__ import annotations

import torch


def propose_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(-1)
