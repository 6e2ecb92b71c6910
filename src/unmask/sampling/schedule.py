"""How many masked positions to commit at each step of a block.

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
