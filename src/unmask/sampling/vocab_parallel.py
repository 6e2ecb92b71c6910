"""Decoding on vocabulary-sharded logits, without gathering the vocabulary.

Under tensor parallelism the model returns its logits as a DTensor sharded over the vocabulary
(`models/parallel.py`): each rank holds V/N columns. Guidance needs nothing more, its mix is
elementwise, and DTensor computes it shard by shard. What the sampler then needs of the whole
vocabulary is a few numbers per position, which the shards give after one small collective each:
- the proposal: each rank's (max, argmax) of its shard, the best of the ranks' maxima winning
  (ties to the lowest rank, so to the lowest token id, as `argmax` breaks them);
- softmax statistics: the global max m (as above) and Σ exp(logit − m), an all-reduced sum, so a
  token's probability is exp(logit − m) / Σ, computed as `softmax` computes it;
- the proposed token's logit, from the rank that holds it (an all-reduced max).
Communication per step is a few (B, T) tensors, against B·T·V for the gathered logits.

Sampling at temperature > 0 draws the Gumbel noise of the whole vocabulary on every rank from the
shared generator and keeps its own columns, so a seed gives the same tokens at any TP degree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def is_vocab_sharded(logits: torch.Tensor) -> bool:
    """Whether `logits` is a DTensor split over its last (vocabulary) dim, as the sharded LM head returns."""
    return isinstance(logits, DTensor) and logits.placements[0].is_shard(logits.ndim - 1)


def _shard(logits: DTensor) -> tuple[torch.Tensor, int, dist.ProcessGroup]:
    """(this rank's columns, the id of its first column, the mesh's process group).

    DTensor shards as `torch.chunk` does: every rank but the last holds ceil(V / N) columns."""
    mesh = logits.device_mesh
    width = -(-logits.shape[-1] // mesh.size())
    return logits.to_local(), mesh.get_local_rank() * width, mesh.get_group()


def _gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(N, *t.shape): every rank's t, in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=op, group=group)
    return t


def _argmax_over_ranks(values: torch.Tensor, offset: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (max, argmax) of the last dim from each rank's `values` shard (columns from `offset`)."""
    best, index = values.max(-1)
    maxima, ids = _gather(best, group), _gather(index + offset, group)
    winner = maxima.argmax(0, keepdim=True)   # first rank among equals
    return maxima.gather(0, winner).squeeze(0), ids.gather(0, winner).squeeze(0)


def propose_tokens(logits: DTensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`noise.propose_tokens` for sharded logits: the same tokens, replicated on every rank."""
    local, offset, group = _shard(logits)
    if temperature == 0:
        return _argmax_over_ranks(local, offset, group)[1]
    u = torch.rand(logits.shape, dtype=torch.float64, device=local.device, generator=generator)
    u = u[..., offset:offset + local.shape[-1]].clamp_min(torch.finfo(torch.float64).tiny)
    return _argmax_over_ranks(local.double() - temperature * torch.log(-torch.log(u)), offset, group)[1]


def greedy_tokens(logits: DTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax tokens, their probabilities): `softmax(logits).max(-1)` for sharded logits."""
    local, offset, group = _shard(logits)
    best, tokens = _argmax_over_ranks(local, offset, group)
    total = _reduce((local - best.unsqueeze(-1)).exp().sum(-1), dist.ReduceOp.SUM, group)
    return tokens, 1 / total


def softmax_stats(logits: DTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, Σ exp(logit − m)) over the whole vocabulary, (B, T) each: softmax = exp(logit − m) / Σ."""
    local, offset, group = _shard(logits)
    m = _reduce(local.amax(-1), dist.ReduceOp.MAX, group)
    return m, _reduce((local - m.unsqueeze(-1)).exp().sum(-1), dist.ReduceOp.SUM, group)


def token_logit(logits: DTensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits[..., tokens] (B, T), read on the rank that holds each token."""
    local, offset, group = _shard(logits)
    mine = (tokens >= offset) & (tokens < offset + local.shape[-1])
    picked = local.gather(-1, (tokens - offset).clamp(0, local.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return _reduce(picked.masked_fill(~mine, float("-inf")), dist.ReduceOp.MAX, group)


def token_log_probs(logits: DTensor, tokens: torch.Tensor) -> torch.Tensor:
    """`logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)` for sharded logits."""
    m, total = softmax_stats(logits)
    return token_logit(logits, tokens) - m - total.log()


def token_confidence(logits: DTensor, tokens: torch.Tensor, rule: str) -> torch.Tensor:
    """`remasking.token_confidence` for sharded logits (the rules that read probabilities)."""
    m, total = softmax_stats(logits)
    if rule == "low_confidence":
        return (token_logit(logits, tokens) - m).exp() / total
    local, offset, group = _shard(logits)
    if rule == "margin":
        top2 = _gather(local.topk(2, dim=-1).values, group)      # (N, B, T, 2)
        top2 = top2.movedim(0, -2).flatten(-2).topk(2, dim=-1).values
        probs = (top2 - m.unsqueeze(-1)).exp() / total.unsqueeze(-1)
        return probs[..., 0] - probs[..., 1]
    if rule == "entropy":
        probs = (local - m.unsqueeze(-1)).exp() / total.unsqueeze(-1)
        partial = (probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1)
        return _reduce(partial, dist.ReduceOp.SUM, group)
    raise ValueError(f"no sharded form of the remasking rule {rule!r}")


def on_shards(fn, *tensors: DTensor) -> DTensor:
    """fn (elementwise over the vocabulary) applied to each rank's columns of vocabulary-sharded
    tensors, the result sharded as the first one is: what DTensor does for its own ops, for an fn
    that mixes in plain tensors (a per-row guidance weight), which DTensor refuses."""
    first = tensors[0]
    return DTensor.from_local(fn(*(t.to_local() for t in tensors)), first.device_mesh, first.placements)


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] along the first (batch) dim, for plain or vocabulary-sharded logits (DTensor does
    not index with a plain tensor)."""
    if not is_vocab_sharded(t):
        return t[index]
    return DTensor.from_local(t.to_local()[index], t.device_mesh, t.placements)


def forbid_tokens(logits: DTensor, ids: torch.Tensor) -> DTensor:
    """The logits with the given token ids at −inf, each on the rank that holds it."""
    local, offset, _ = _shard(logits)
    mine = ids[(ids >= offset) & (ids < offset + local.shape[-1])] - offset
    local[..., mine] = float("-inf")
    return logits
