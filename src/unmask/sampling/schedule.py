"""How many masked positions to commit at each step of a block, and how to cut a length into blocks.

The reference spreads a block's n masked positions over s steps as evenly as possible: every step
commits n // s, and the first n % s steps one more. Computed for all rows at once.
"""

from __future__ import annotations

import torch


def transfer_schedule(masked_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masked counts → (B, steps) tokens to commit per step (row sums equal the counts)."""
    counts = masked_counts.long().view(-1, 1)
    base, remainder = counts // steps, counts % steps
    step_index = torch.arange(steps, device=counts.device).view(1, -1)
    return base + (step_index < remainder).long()


def block_length_for(gen_length: int, preferred: int, steps: int | None = None) -> int:
    """A block length for an arbitrary `gen_length` (a client's max_tokens, a task's max_gen_toks).

    The largest block <= `preferred` that divides gen_length (and gives `steps` a whole number of
    steps per block, at most one per token), so exactly gen_length tokens are generated; when the
    only such blocks are shorter than 8 tokens (gen_length prime, say), the whole length is one
    block instead, since semi-autoregressive blocks that short cost many forward passes.
    Shared by the server and the lm-eval adapter so both cut a length the same way.
    """
    for block in range(min(preferred, gen_length), 0, -1):
        blocks = gen_length // block
        if gen_length % block == 0 and (steps is None or (steps % blocks == 0 and steps // blocks <= block)):
            return block if block >= min(8, gen_length) else gen_length
    return gen_length
