"""Training objectives of a masked diffusion LM and the held-out bound (LLaDA Eq. 3).

Forward process: a sequence draws one time t ~ U[0, 1); each scored token is replaced by the mask
id independently with probability p_mask = (1 - eps)·t + eps (eps keeps p_mask away from 0, where
the 1/p_mask weight would explode). The model predicts the clean tokens at the masked positions and
the cross-entropy there is weighted by 1/p_mask: that weighted sum is a Monte-Carlo estimate of the
negative ELBO (LLaDA Eq. 3), so minimising it maximises a bound on the log-likelihood.

Every random draw comes from a `torch.Generator` on the CPU that the caller seeds, so a step's
noise depends on nothing but that seed: resumed, re-run and multi-process runs draw the same masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

EPS = 1e-3


@dataclass
class Batch:
    """Clean sequences (B, L); for SFT also each row's prompt length (B,), whose tokens stay visible;
    for packed pretraining rows with document attention, each token's document number (B, L)."""

    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        pl = None if self.prompt_lengths is None else self.prompt_lengths.to(device)
        seg = None if self.segments is None else self.segments.to(device)
        return Batch(self.input_ids.to(device), pl, seg)


def document_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, L, L) mask letting each token attend only within its own document, and positions
    that restart at 0 with every document: each packed document is then trained as if it were
    alone in its row, with no other document's facts to attend to."""
    mask = (segments[:, :, None] == segments[:, None, :])[:, None]
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return mask, index - first


def mask_probability(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return (1 - eps) * t + eps


def add_noise(input_ids: torch.Tensor, scored: torch.Tensor, t: torch.Tensor, mask_id: int,
              generator: torch.Generator, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each `scored` position independently with p_mask(t) of its row.

    Returns (noisy ids, masked positions, p_mask per position), all (B, L) on input_ids' device.
    """
    p_mask = mask_probability(t, eps)[:, None].expand(input_ids.shape)
    u = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    masked = (u < p_mask.to(input_ids.device)) & scored
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask.to(input_ids.device)


def _weighted_ce(model, noisy: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                 p_mask: torch.Tensor, documents: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, L) cross-entropy / p_mask at masked positions, 0 elsewhere; float32 whatever the autocast.
    documents: `document_attention`'s (mask, positions) for packed rows that keep to their documents."""
    if documents is None:
        logits = model(noisy).logits
    else:
        mask, positions = documents
        logits = model(noisy, attention_mask=mask, position_ids=positions).logits
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    out[masked] = ce / p_mask[masked].float()
    return out


def pretrain_loss(model, input_ids: torch.Tensor, mask_id: int, generator: torch.Generator,
                  eps: float = EPS, random_length_prob: float = 0.01,
                  segments: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA pretraining loss: Σ_masked CE / p_mask, divided by batch × length.

    With probability `random_length_prob` the whole batch is cut to a random length in [1, L]
    (LLaDA's choice: one cut per batch keeps the batch rectangular and needs no padding or
    attention mask) so the model also sees short inputs; the division is then by B × cut length.
    segments: each token's document number; attention then stays inside documents.
    """
    if torch.rand((), generator=generator) < random_length_prob:
        length = int(torch.randint(1, input_ids.shape[1] + 1, (), generator=generator))
        input_ids = input_ids[:, :length]
        segments = None if segments is None else segments[:, :length]
    B, L = input_ids.shape
    t = torch.rand(B, generator=generator)
    scored = torch.ones_like(input_ids, dtype=torch.bool)
    noisy, masked, p_mask = add_noise(input_ids, scored, t, mask_id, generator, eps)
    documents = None if segments is None else document_attention(segments)
    return _weighted_ce(model, noisy, input_ids, masked, p_mask, documents).sum() / (B * L)


def response_positions(input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) True where a position belongs to the response (at or after the prompt length)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return positions[None, :] >= prompt_lengths[:, None]


def sft_loss(model, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, mask_id: int,
             generator: torch.Generator, eps: float = EPS, cond_drop: float = 0.0) -> torch.Tensor:
    """LLaDA SFT loss: only response tokens (EOS padding included) are masked and scored.

    Each row's Σ CE / p_mask is divided by that row's response length, then averaged over rows.
    cond_drop: with this probability a row's whole prompt is replaced by mask tokens (still never
    scored), which trains p(response | masked prompt) explicitly — "standard" CFG training, as
    opposed to the unsupervised CFG of a pretrained model.
    """
    B, _ = input_ids.shape
    response = response_positions(input_ids, prompt_lengths)
    t = torch.rand(B, generator=generator)
    noisy, masked, p_mask = add_noise(input_ids, response, t, mask_id, generator, eps)
    if cond_drop > 0:
        drop = (torch.rand(B, generator=generator) < cond_drop).to(input_ids.device)
        noisy = torch.where(drop[:, None] & ~response, torch.full_like(noisy, mask_id), noisy)
    per_row = _weighted_ce(model, noisy, input_ids, masked, p_mask).sum(1)
    return (per_row / response.sum(1).clamp(min=1)).mean()


def batch_loss(model, batch: Batch, mask_id: int, generator: torch.Generator, cond_drop: float = 0.0) -> torch.Tensor:
    """The training loss of `batch`: SFT when it carries prompt lengths, pretraining otherwise."""
    if batch.prompt_lengths is None:
        return pretrain_loss(model, batch.input_ids, mask_id, generator, segments=batch.segments)
    return sft_loss(model, batch.input_ids, batch.prompt_lengths, mask_id, generator, cond_drop=cond_drop)


@dataclass
class Bound:
    """Held-out MDM negative ELBO in nats per scored token, and exp(nats): an upper bound on perplexity."""

    nats_per_token: float
    tokens: int

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nats_per_token)


@torch.no_grad()
def mdm_bound(model, batches: Iterable[Batch], mask_id: int, mc_samples: int = 8, seed: int = 0) -> Bound:
    """The negative ELBO of held-out batches under a FIXED Monte-Carlo protocol.

    For batch b and sample k, each row uses t = (k + u) / mc_samples with one offset u per row drawn
    from a generator seeded by (seed, b): times are stratified over [0, 1) and the draws depend only
    on the protocol, never on training state, so numbers compare across runs and checkpoints.
    Pretraining batches score every token; SFT batches score the response given the prompt.
    Returns Σ_k Σ_masked CE / p_mask / (mc_samples × scored tokens), i.e. nats per token.
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for b, batch in enumerate(batches):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        ids = batch.input_ids
        scored = (torch.ones_like(ids, dtype=torch.bool) if batch.prompt_lengths is None
                  else response_positions(ids, batch.prompt_lengths))
        u = torch.rand(ids.shape[0], generator=gen)
        documents = None if batch.segments is None else document_attention(batch.segments)  # once per batch
        for k in range(mc_samples):
            t = (k + u) / mc_samples
            noisy, masked, p_mask = add_noise(ids, scored, t, mask_id, gen)
            total += float(_weighted_ce(model, noisy, ids, masked, p_mask, documents).sum())
        tokens += int(scored.sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("mdm_bound got no tokens to score")
    return Bound(total / (mc_samples * tokens), tokens)
