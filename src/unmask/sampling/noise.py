"""Proposing tokens: argmax at temperature 0, exact sampling from softmax(logits / T) above it.

Gumbel-max in float64: argmax(logits − T·log(−log U)) = argmax(exp(logits) / (−log U)^T), the
reference's form, computed in log space so large logits cannot overflow exp().
"""

from __future__ import annotations

import torch

from . import vocab_parallel


def propose_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if vocab_parallel.is_vocab_sharded(logits):
        return vocab_parallel.propose_tokens(logits, temperature, generator)
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(-1)


def forbid_tokens(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The logits with the token ids `ids` at −inf (in place), so they are never proposed."""
    if vocab_parallel.is_vocab_sharded(logits):
        return vocab_parallel.forbid_tokens(logits, ids)
    logits[..., ids] = float("-inf")
    return logits
