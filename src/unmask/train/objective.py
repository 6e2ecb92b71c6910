"""Training objectives of a masked diffusion LM and the held-out bound (LLaDA Eq. 3).

Forward process: a sequence draws one time t ~ U[0, 1); each scored token is replaced by the mask
id independently with probability p_mask = (1 - eps)·t + eps (eps keeps p_mask away from 0, where
the 1/p_mask weight would explode). The model predicts the clean tokens at the masked positions and
the cross-entropy there is weighted by 1/p_mask: that weighted sum is a Monte-Carlo estimate of the
negative ELBO (LLaDA Eq. 3), so minimising it maximises a bound on the log-likelihood.

Block diffusion (LLaDA2.x; BD3-LM, Arriola et al. 2025): with a block length b the sequence is cut
into blocks of b tokens and modelled autoregressively over blocks, each block by masked diffusion
given the CLEAN blocks before it — which is what block-by-block decoding conditions on. BD3-LM's
vectorised training computes every block's term in one forward pass over [noisy | clean] (2L
tokens, both halves at positions 0..L-1) under the mask of `block_diffusion_mask`; LLaDA2's own
training code (inclusionAI/dFactory, `block_diffusion_mode`) builds the same input and mask. Each
block draws its own t, and the loss keeps the 1/p_mask weight, so the sum over blocks is an
unbiased estimate of the block-diffusion negative ELBO, a bound on −log p(x) = Σ_k −log p(x_k | x_<k).

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


def block_diffusion_mask(positions: torch.Tensor, block_length: int,
                         documents: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, 2L, 2L) bool mask of BD3-LM's training input [noisy | clean], both halves at `positions` (B, L).

    A token's block is ⌊position / b⌋. Noisy block k attends to itself (bidirectionally) and to
    the clean blocks < k: it is denoised given clean earlier blocks, as when decoding, where the
    blocks before the current one are final. The clean half is block-causal (block k sees clean
    blocks ≤ k): it computes the keys and values that the noisy blocks read, as the KV cache of
    finished blocks does at inference. No query reads a noisy key outside its own block, so no
    block's masks leak into another's context. documents: `document_attention`'s (B, 1, L, L)
    mask, AND-ed into every quadrant (with positions restarting per document, each document has
    its own block grid).
    """
    block = positions // block_length
    same = block[:, :, None] == block[:, None, :]
    before = block[:, None, :] < block[:, :, None]
    if documents is not None:
        same, before = same & documents[:, 0], before & documents[:, 0]
    noisy_rows = torch.cat([same, before], dim=2)
    clean_rows = torch.cat([torch.zeros_like(same), same | before], dim=2)
    return torch.cat([noisy_rows, clean_rows], dim=1)[:, None]


@dataclass
class Attention:
    """How the model sees a batch of rows (B, L); built once per batch by `attention_for`.

    mask/positions: None (full bidirectional attention, positions 0..L-1), or what the model is
    called with: document attention's (B, 1, L, L), or block diffusion's (B or 1, 1, 2L, 2L) over
    [noisy | clean]. blocks (block diffusion only): each token's running block number in its row,
    which picks the token's noise level, one per block.
    """

    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    blocks: torch.Tensor | None = None

    def uniform(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """One U[0, 1) draw per row (B,), or per block, spread over its tokens (B, L)."""
        if self.blocks is None:
            return torch.rand(shape[0], generator=generator)
        return torch.rand(shape, generator=generator).gather(1, self.blocks.cpu())

    def logits(self, model, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) at the noisy sequence's positions; `clean` is the context copy that
        block diffusion conditions on (ignored otherwise)."""
        if self.mask is None:
            return model(noisy).logits
        if self.blocks is None:
            return model(noisy, attention_mask=self.mask, position_ids=self.positions).logits
        both = torch.cat([noisy, clean], dim=1)  # the clean half's logits are never used: not computed
        return model(both, attention_mask=self.mask, position_ids=self.positions,
                     logits_slice=slice(0, noisy.shape[1])).logits


def attention_for(input_ids: torch.Tensor, segments: torch.Tensor | None = None,
                  block_length: int | None = None) -> Attention:
    """The `Attention` of rows `input_ids` (B, L): with `segments`, packed documents attend only
    within themselves with positions restarting; with `block_length`, block diffusion's
    [noisy | clean] input (the two compose: blocks then restart with each document)."""
    if segments is None and not block_length:
        return Attention()
    if segments is None:
        documents, positions = None, torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    else:
        documents, positions = document_attention(segments)
    if not block_length:
        return Attention(documents, positions)
    starts = (positions % block_length == 0).expand(input_ids.shape)  # a document start is a block start
    return Attention(block_diffusion_mask(positions, block_length, documents), positions.repeat(1, 2),
                     starts.long().cumsum(1) - 1)


def mask_probability(t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return (1 - eps) * t + eps


def add_noise(input_ids: torch.Tensor, scored: torch.Tensor, t: torch.Tensor, mask_id: int,
              generator: torch.Generator, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each `scored` position independently with p_mask(t); t is one time per row (B,) or
    per position (B, L) (block diffusion: each block's time on its tokens).

    Returns (noisy ids, masked positions, p_mask per position), all (B, L) on input_ids' device.
    """
    p_mask = mask_probability(t if t.dim() == 2 else t[:, None], eps).expand(input_ids.shape)
    u = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    masked = (u < p_mask.to(input_ids.device)) & scored
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask.to(input_ids.device)


def _weighted_ce(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                 p_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) cross-entropy / p_mask at masked positions, 0 elsewhere; float32 whatever the autocast."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    out[masked] = ce / p_mask[masked].float()
    return out


def pretrain_loss(model, input_ids: torch.Tensor, mask_id: int, generator: torch.Generator,
                  eps: float = EPS, random_length_prob: float = 0.01,
                  segments: torch.Tensor | None = None, block_length: int | None = None) -> torch.Tensor:
    """LLaDA pretraining loss: Σ_masked CE / p_mask, divided by batch × length.

    With probability `random_length_prob` the whole batch is cut to a random length in [1, L]
    (LLaDA's choice: one cut per batch keeps the batch rectangular and needs no padding or
    attention mask) so the model also sees short inputs; the division is then by B × cut length.
    segments: each token's document number; attention then stays inside documents.
    block_length: block diffusion (see the module docstring): one t per block, each block
    predicted from its noisy self and the clean blocks before it.
    Draws, in order: the cut decision (and length), t (per row, or per block), u per token.
    """
    if torch.rand((), generator=generator) < random_length_prob:
        length = int(torch.randint(1, input_ids.shape[1] + 1, (), generator=generator))
        input_ids = input_ids[:, :length]
        segments = None if segments is None else segments[:, :length]
    B, L = input_ids.shape
    attention = attention_for(input_ids, segments, block_length)
    t = attention.uniform(input_ids.shape, generator)
    scored = torch.ones_like(input_ids, dtype=torch.bool)
    noisy, masked, p_mask = add_noise(input_ids, scored, t, mask_id, generator, eps)
    logits = attention.logits(model, noisy, input_ids)
    return _weighted_ce(logits, input_ids, masked, p_mask).sum() / (B * L)


def response_positions(input_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) True where a position belongs to the response (at or after the prompt length)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return positions[None, :] >= prompt_lengths[:, None]


def sft_loss(model, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, mask_id: int,
             generator: torch.Generator, eps: float = EPS, cond_drop: float = 0.0,
             block_length: int | None = None) -> torch.Tensor:
    """LLaDA SFT loss: only response tokens (EOS padding included) are masked and scored.

    Each row's Σ CE / p_mask is divided by that row's response length, then averaged over rows.
    cond_drop: with this probability a row's whole prompt is replaced by mask tokens (still never
    scored), which trains p(response | masked prompt) explicitly — "standard" CFG training, as
    opposed to the unsupervised CFG of a pretrained model.
    block_length: block diffusion on the row's absolute block grid (the prompt from position 0, as
    decoding lays it out): response blocks are noised, each with its own t, and denoised given the
    clean blocks before them, prompt included. A dropped prompt is masked in both the noisy and the
    clean copy, as the unconditional branch of block-diffusion CFG sees it (docs/block-diffusion.md).
    """
    B, _ = input_ids.shape
    response = response_positions(input_ids, prompt_lengths)
    attention = attention_for(input_ids, block_length=block_length)
    t = attention.uniform(input_ids.shape, generator)
    noisy, masked, p_mask = add_noise(input_ids, response, t, mask_id, generator, eps)
    clean = input_ids
    if cond_drop > 0:
        drop = (torch.rand(B, generator=generator) < cond_drop).to(input_ids.device)
        prompt = drop[:, None] & ~response
        noisy = noisy.masked_fill(prompt, mask_id)
        clean = clean.masked_fill(prompt, mask_id)
    per_row = _weighted_ce(attention.logits(model, noisy, clean), input_ids, masked, p_mask).sum(1)
    return (per_row / response.sum(1).clamp(min=1)).mean()


def batch_loss(model, batch: Batch, mask_id: int, generator: torch.Generator, cond_drop: float = 0.0,
               block_length: int | None = None) -> torch.Tensor:
    """The training loss of `batch`: SFT when it carries prompt lengths, pretraining otherwise;
    block diffusion with blocks of `block_length` tokens, if given."""
    if batch.prompt_lengths is None:
        return pretrain_loss(model, batch.input_ids, mask_id, generator, segments=batch.segments,
                             block_length=block_length)
    return sft_loss(model, batch.input_ids, batch.prompt_lengths, mask_id, generator, cond_drop=cond_drop,
                    block_length=block_length)


@dataclass
class Bound:
    """Held-out MDM negative ELBO in nats per scored token, and exp(nats): an upper bound on perplexity."""

    nats_per_token: float
    tokens: int

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nats_per_token)


@torch.no_grad()
def mdm_bound(model, batches: Iterable[Batch], mask_id: int, mc_samples: int = 8, seed: int = 0,
              block_length: int | None = None) -> Bound:
    """The negative ELBO of held-out batches under a FIXED Monte-Carlo protocol.

    For batch b and sample k, each row uses t = (k + u) / mc_samples with one offset u per row drawn
    from a generator seeded by (seed, b): times are stratified over [0, 1) and the draws depend only
    on the protocol, never on training state, so numbers compare across runs and checkpoints.
    Pretraining batches score every token; SFT batches score the response given the prompt.
    block_length: the block-diffusion bound, the objective's: one offset u per block, each block
    scored given the clean blocks before it (Σ over blocks bounds −log p(x) under block-causal
    decoding's factorisation).
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
        attention = attention_for(ids, batch.segments, block_length)  # once per batch
        u = attention.uniform(ids.shape, gen)
        for k in range(mc_samples):
            t = (k + u) / mc_samples
            noisy, masked, p_mask = add_noise(ids, scored, t, mask_id, gen)
            total += float(_weighted_ce(attention.logits(model, noisy, ids), ids, masked, p_mask).sum())
        tokens += int(scored.sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("mdm_bound got no tokens to score")
    return Bound(total / (mc_samples * tokens), tokens)
