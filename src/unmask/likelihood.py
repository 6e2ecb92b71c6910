"""Log-likelihood of a continuation under a masked diffusion LM, guided or not (LLaDA Eq. 6).

An MDM has no left-to-right factorisation, so log p(r | c) is scored through its training bound
(LLaDA Eq. 6): for a continuation r of length L after a context c,

    log p(r | c) >= E_l [ (L / l) · Σ_{i masked} log p(r_i | c, r with l positions masked) ],

l uniform on 1..L, the l positions uniform among the L, the context never masked. Three ways to
evaluate it share one engine here, each described by a *plan* (which positions each forward row
masks, which it scores, with what weight):

- "mc": the Monte Carlo estimate, l stratified across each mini-batch as LLaDA does;
- "exact": the same bound by enumerating all 2^L − 1 mask patterns (tiny L only; zero variance);
- "chain": SMDM's chain-rule mode, token i scored with r_<i visible and r_>=i masked.

Block-diffusion models (LLaDA2.x) attend causally across blocks of `block_length` tokens, and
decode each block given the finished blocks before it; their bound is the same sum taken block
by block: the continuation is cut at absolute block boundaries, each block's term masks
positions in that block only (earlier blocks visible and clean, later blocks masked and never
attended), under the block-causal attention mask — BD3-LM's bound, log p(r | c) ≥ Σ_k bound of
block k given c and r's earlier blocks. Each block gets the plan of the chosen mode; the chain
mode is then exactly the sequential chain rule the model decodes with.

Guidance (unsupervised CFG, Nie et al. 2025) scores with `uncond + (w + 1)(cond − uncond)`, the unconditional row being
the same canvas with the context masked (or the span of it that the `guidance` form names; its
schedule reads t as the fraction of the continuation visible in that row); the mixed logits are
renormalised (log_softmax) before the log-probability is read. Conditional and unconditional rows
go through the model as one doubled batch, and every requested cfg scale is mixed from that one
forward pass, so a sweep over scales costs one scoring run and the scales share their mask draws
(common random numbers, which makes the differences between scales much less noisy than separate
runs would).

The column PMI ("pmi" among the scales) is the baseline CFG scoring should beat: the pointwise
mutual information bound(r | c) − bound(r | c masked), each term the same bound on the same mask
draws (contextual calibration / PMI_DC scoring for multiple choice, Zhao et al. 2021, Holtzman et
al. 2021, with the masked context as the content-free input).

Several guidance forms in one run (an ablation, `unmask eval --guidance F1 F2 ...`): a column may
be a `Column(scale, form)`. The conditional rows do not depend on the form, so every forward pass
holds them once, followed by one block of unconditional rows per distinct unconditional canvas;
forms that differ only in their schedule share both blocks (a schedule re-weights the same two
logits, by each row's t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling import block_generate, generate, is_block_diffusion, left_pad
from .sampling import vocab_parallel
from .sampling.blocks import padded_block_causal
from .sampling.generate import resolve_mask_id
from .sampling.options import BlockOptions, check_cfg_scale, check_scoring_guidance, context_length
from .sampling.guidance import DEFAULT, Guidance, forward_logits

MODES = ("mc", "exact", "chain")
PMI = "pmi"   # a scoring column: bound(r | c) − bound(r | unconditional canvas), not a cfg scale


def check_scoring_scale(w: float | str) -> float | str:
    """A scoring column: a cfg scale (check_cfg_scale) or PMI."""
    return w if w == PMI else check_cfg_scale(w)


@dataclass(frozen=True)
class Column:
    """One scoring column: a cfg scale (or PMI) under its own guidance form."""

    scale: float | str
    guidance: Guidance = DEFAULT

    @property
    def guided(self) -> bool:
        """Whether the column reads the unconditional rows (w = 0 is the conditional bound alone)."""
        return self.scale == PMI or self.scale > 0


def scoring_columns(cfg_scales: Sequence[float | str | Column], guidance: str | Guidance) -> list[Column]:
    """Checked columns: a bare scale is taken under `guidance`; a Column keeps its own form."""
    form = check_scoring_guidance(guidance)
    columns = [c if isinstance(c, Column) else Column(c, form) for c in cfg_scales]
    return [Column(check_scoring_scale(c.scale), check_scoring_guidance(c.guidance)) for c in columns]


@dataclass
class Estimate:
    """A log-likelihood (nats), its standard error (0 for deterministic modes), and the sample count."""

    value: float
    stderr: float
    n: int


@dataclass
class Request:
    """One (context, continuation) pair in token ids; `seed` fixes its Monte Carlo mask draws."""

    context: Sequence[int]
    continuation: Sequence[int]
    seed: int = 0


@dataclass
class Plan:
    """The forward rows that score one request.

    Row j masks the continuation positions `masked[j]`, sums the log-probabilities at `scored[j]`,
    and adds `weight[j]` times that sum to sample `sample[j]`; the estimate is the mean over samples.
    """

    masked: torch.Tensor   # (R, L) bool
    scored: torch.Tensor   # (R, L) bool
    weight: torch.Tensor   # (R,) float64
    sample: torch.Tensor   # (R,) long; EVERY_SAMPLE: a deterministic term, added to every sample
    n_samples: int


EVERY_SAMPLE = -1


def mc_plan(L: int, mc_num: int, batch_size: int, generator: torch.Generator) -> Plan:
    """`mc_num` Monte Carlo samples; within each mini-batch of `batch_size` the mask counts l are
    evenly spaced from one random offset (stratified), which lowers the variance of the batch mean
    while every l in 1..L keeps probability 1/L overall."""
    ls, masks = [], []
    for start in range(0, mc_num, batch_size):
        b = min(batch_size, mc_num - start)
        offset = torch.rand((), generator=generator, dtype=torch.float64)
        l = ((offset + torch.arange(b, dtype=torch.float64)) * L / b).long().clamp(max=L - 1) + 1
        ranks = torch.rand(b, L, generator=generator).argsort(1)
        ls.append(l)
        masks.append(ranks < l[:, None])
    l = torch.cat(ls)
    masked = torch.cat(masks)
    return Plan(masked, masked, L / l.double(), torch.arange(mc_num), mc_num)


def exact_plan(L: int) -> Plan:
    """Every non-empty mask pattern S with weight 1 / (C(L, |S|) · |S|): the bound exactly."""
    patterns = torch.arange(1, 2 ** L)
    masked = ((patterns[:, None] >> torch.arange(L)) & 1).bool()
    l = masked.sum(1)
    weight = torch.tensor([1.0 / (math.comb(L, int(k)) * int(k)) for k in l], dtype=torch.float64)
    return Plan(masked, masked, weight, torch.zeros(len(patterns), dtype=torch.long), 1)


def chain_plan(L: int) -> Plan:
    """Row i scores r_i with r_<i visible and r_>=i masked; the rows sum to one chain-rule value."""
    cols = torch.arange(L)
    rows = cols[:, None]
    return Plan(cols[None] >= rows, cols[None] == rows, torch.ones(L, dtype=torch.float64),
                torch.zeros(L, dtype=torch.long), 1)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown likelihood mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def make_plan(mode: str, L: int, mc_num: int, batch_size: int, seed: int) -> Plan:
    """The plan for one request. In "mc" mode a continuation with no more mask patterns than
    `mc_num` (2^L − 1 <= mc_num, e.g. every one-token answer) is enumerated instead: the same
    quantity with zero variance and fewer forward rows."""
    check_mode(mode)
    if mode == "chain":
        return chain_plan(L)
    if mode == "exact" or 2 ** L - 1 <= mc_num:
        return exact_plan(L)
    return mc_plan(L, mc_num, batch_size, torch.Generator().manual_seed(seed))


def block_spans(context_length: int, L: int, block_length: int) -> list[tuple[int, int]]:
    """The continuation's [start, stop) pieces (in continuation columns) cut at absolute block boundaries."""
    cuts = [0] + [c - context_length for c in range(context_length + 1, context_length + L)
                  if c % block_length == 0] + [L]
    return list(zip(cuts[:-1], cuts[1:]))


def blockwise_plan(mode: str, spans: list[tuple[int, int]], mc_num: int, batch_size: int, seed: int) -> Plan:
    """One plan per block, side by side: block k's rows mask and score inside block k only, with
    the earlier blocks visible and the later ones masked. Deterministic blocks (exact, chain, short)
    add to every Monte Carlo sample of the others."""
    L = spans[-1][1]
    parts = [make_plan(mode, stop - start, mc_num, batch_size, seed * 1_000_003 + k)
             for k, (start, stop) in enumerate(spans)]
    n_samples = max(p.n_samples for p in parts)
    masked, scored, weight, sample = [], [], [], []
    for (start, stop), part in zip(spans, parts):
        R = len(part.weight)
        m = torch.zeros(R, L, dtype=torch.bool)
        m[:, start:stop], m[:, stop:] = part.masked, True
        sc = torch.zeros(R, L, dtype=torch.bool)
        sc[:, start:stop] = part.scored
        masked.append(m)
        scored.append(sc)
        weight.append(part.weight)
        sample.append(part.sample if part.n_samples == n_samples else torch.full((R,), EVERY_SAMPLE))
    return Plan(torch.cat(masked), torch.cat(scored), torch.cat(weight), torch.cat(sample), n_samples)


def score_requests(model, requests: Sequence[Request], *, cfg_scales: Sequence[float | str | Column] = (0.0,),
                   mode: str = "mc", mc_num: int = 128, batch_size: int = 32,
                   mask_id: int | None = None, block_length: int | None = None,
                   guidance: str | Guidance = DEFAULT) -> list[list[Estimate]]:
    """Score many requests at several cfg scales: result[request][scale] is an Estimate.
    A scale may be PMI ("pmi"): that column is the PMI score (module docstring). `guidance` is the
    form (unconditional canvas and schedule; A-CFG does not apply to scoring) of the bare scales;
    a `Column` entry carries its own form, and all columns share the conditional rows.

    Rows of different requests share forward batches (left-padded, with an attention mask, so
    padding changes nothing). Each request's mask draws depend only on its own seed.
    For a block-diffusion model the bound is taken block by block (see the module docstring) with
    `block_length` (default: 32, LLaDA2's).
    """
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num ({mc_num}) and batch_size ({batch_size}) must be positive")
    columns = scoring_columns(cfg_scales, guidance)
    block_length = scoring_block_length(model, block_length)
    if block_length is None:
        plans = [make_plan(mode, len(r.continuation), mc_num, batch_size, r.seed) for r in requests]
    else:
        plans = [blockwise_plan(mode, block_spans(len(r.context), len(r.continuation), block_length), mc_num,
                                batch_size, r.seed) for r in requests]
    return score_plans(model, requests, plans, columns, batch_size, mask_id, block_length)


def scoring_block_length(model, given: int | None) -> int | None:
    """The block length a model is scored with: None for LLaDA models (fully bidirectional)."""
    if not is_block_diffusion(model):
        if given is not None:
            raise ValueError("block_length applies to block-diffusion (LLaDA2.x) models only")
        return None
    block_length = BlockOptions().block_length if given is None else given
    if type(block_length) is not int or block_length < 1:
        raise ValueError(f"block_length must be a positive integer (got {block_length!r})")
    return block_length


@torch.no_grad()
def score_plans(model, requests: Sequence[Request], plans: Sequence[Plan], columns: Sequence[Column],
                batch_size: int, mask_id: int | None = None,
                block_length: int | None = None) -> list[list[Estimate]]:
    """Run every plan's rows through the model, `batch_size` rows per forward (times 1 + the number
    of distinct unconditional canvases under CFG); with `block_length`, under the block-causal mask
    of that block length."""
    mask_id = resolve_mask_id(model, mask_id)
    limit = context_length(model)
    for r in requests:
        if limit is not None and len(r.context) + len(r.continuation) > limit:
            raise ValueError(f"context ({len(r.context)} tokens) + continuation ({len(r.continuation)}) "
                             f"exceeds the model's context of {limit} tokens; truncate the context")
    sums = [torch.zeros(len(columns), p.n_samples, dtype=torch.float64) for p in plans]
    rows = [(i, j) for i, p in enumerate(plans) for j in range(len(p.weight))]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        values = _score_rows(model, [(requests[i], plans[i], j) for i, j in chunk], columns, mask_id, block_length)
        for (i, j), v in zip(chunk, values.T):
            sample = int(plans[i].sample[j])
            if sample == EVERY_SAMPLE:
                sums[i] += v[:, None]
            else:
                sums[i][:, sample] += v
    return [[_estimate(s) for s in per_scale] for per_scale in sums]


def _score_rows(model, rows, columns: Sequence[Column], mask_id: int, block_length: int | None) -> torch.Tensor:
    """(S, B) weighted sums of log p over each row's scored positions, for every column.

    Rows are right-aligned so every continuation ends at the last column and the vocabulary
    projection runs only over the last max-L columns.
    """
    device = next(model.parameters()).device
    width = max(len(r.context) + len(r.continuation) for r, _, _ in rows)
    span = max(len(r.continuation) for r, _, _ in rows)
    B = len(rows)
    ids = torch.full((B, width), mask_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    prompt_index = torch.zeros((B, width), dtype=torch.bool)
    targets = torch.zeros((B, span), dtype=torch.long)
    scored = torch.zeros((B, span), dtype=torch.bool)
    weight = torch.zeros(B, dtype=torch.float64)
    visible = torch.zeros(B, dtype=torch.float64)   # the schedule's t: fraction of the continuation unmasked
    for b, (req, plan, j) in enumerate(rows):
        P, L = len(req.context), len(req.continuation)
        cont = torch.tensor(list(req.continuation), dtype=torch.long)
        ids[b, width - P - L:width - L] = torch.tensor(list(req.context), dtype=torch.long)
        ids[b, width - L:] = cont.masked_fill(plan.masked[j], mask_id)
        attn[b, width - P - L:] = 1
        prompt_index[b, width - P - L:width - L] = True
        targets[b, span - L:] = cont
        scored[b, span - L:] = plan.scored[j]
        weight[b] = plan.weight[j]
        visible[b] = 1 - float(plan.masked[j].sum()) / L
    attention_mask = None if bool(attn.all()) else attn.to(device)
    position_ids = None
    if block_length is not None:   # block-causal over each row's own positions (padding never attended)
        attention_mask, position_ids = padded_block_causal(attn.to(device), block_length)
    ids, prompt_index = ids.to(device), prompt_index.to(device)
    canvases = {c.guidance.canvas: c.guidance for c in columns if c.guided} if bool(prompt_index.any()) else {}
    copies = 1 + len(canvases)   # the conditional rows, then one block per unconditional canvas
    ids = torch.cat([ids, *(form.unconditional(ids, prompt_index, mask_id) for form in canvases.values())])
    attention_mask = None if attention_mask is None else torch.cat([attention_mask] * copies)
    position_ids = None if position_ids is None else torch.cat([position_ids] * copies)
    logits = forward_logits(model, ids, attention_mask, slice(width - span, width), position_ids=position_ids).float()
    cond, *unconds = logits.chunk(copies)
    uncond = dict(zip(canvases, unconds))
    targets, scored = targets.to(device), scored.to(device)
    out = torch.empty(len(columns), B, dtype=torch.float64)
    visible = visible.to(device)

    def bound(logits: torch.Tensor) -> torch.Tensor:
        return (target_log_probs(logits, targets) * scored).sum(1).double().cpu() * weight

    for s, c in enumerate(columns):
        u = uncond.get(c.guidance.canvas, cond)   # no context: the unconditional rows are the conditional ones
        if c.scale == PMI:
            out[s] = bound(cond) - bound(u)
        else:
            out[s] = bound(c.guidance.mix(cond, u, c.scale, visible) if c.scale > 0 and c.guidance.canvas in uncond
                           else cond)
    return out


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets], (B, L); on vocabulary-sharded logits without gathering them."""
    if vocab_parallel.is_vocab_sharded(logits):
        return vocab_parallel.token_log_probs(logits, targets)
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def _estimate(samples: torch.Tensor) -> Estimate:
    n = samples.numel()
    stderr = float(samples.std() / math.sqrt(n)) if n > 1 else 0.0
    return Estimate(float(samples.mean()), stderr, n)


def _score_one(model, context_ids, continuation_ids, plan: Plan, cfg_scale: float, batch_size: int,
               mask_id: int | None) -> Estimate:
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (got {cfg_scale}); 0 turns guidance off")
    request = Request(list(context_ids), list(continuation_ids))
    return score_plans(model, [request], [plan], [Column(cfg_scale)], batch_size, mask_id)[0][0]


def mc_loglikelihood(model, context_ids, continuation_ids, *, mc_num: int = 128, batch_size: int = 32,
                     cfg_scale: float = 0.0, mask_id: int | None = None, seed: int = 0) -> Estimate:
    """The Monte Carlo bound (LLaDA Eq. 6) from `mc_num` samples; stderr = std / sqrt(mc_num).

    The stratified draws are negatively correlated, so the reported stderr is conservative.
    """
    plan = mc_plan(len(continuation_ids), mc_num, batch_size, torch.Generator().manual_seed(seed))
    return _score_one(model, context_ids, continuation_ids, plan, cfg_scale, batch_size, mask_id)


def exact_bound(model, context_ids, continuation_ids, *, cfg_scale: float = 0.0, batch_size: int = 32,
                mask_id: int | None = None) -> Estimate:
    """The quantity `mc_loglikelihood` estimates, by enumerating all 2^L − 1 mask patterns."""
    plan = exact_plan(len(continuation_ids))
    return _score_one(model, context_ids, continuation_ids, plan, cfg_scale, batch_size, mask_id)


def chain_rule_loglikelihood(model, context_ids, continuation_ids, *, cfg_scale: float = 0.0,
                             batch_size: int = 32, mask_id: int | None = None) -> Estimate:
    """Σ_i log p(r_i | context, r_<i, r_>=i masked): all L prefixes in one batch."""
    plan = chain_plan(len(continuation_ids))
    return _score_one(model, context_ids, continuation_ids, plan, cfg_scale, batch_size, mask_id)


def greedy_checks(model, requests: Sequence[Request], *, cfg_scale: float = 0.0, batch_size: int = 32,
                  mask_id: int | None = None, block_length: int | None = None,
                  guidance: str | Guidance = DEFAULT) -> list[bool]:
    """For each request: would the sampler produce exactly its continuation? Temperature 0, one
    token per step. Requests with the same continuation length share a batch (left-padded, which
    leaves each row equal to its context run alone)."""
    mask_id = resolve_mask_id(model, mask_id)
    block_length = scoring_block_length(model, block_length)
    device = next(model.parameters()).device
    result = [True] * len(requests)          # an empty continuation is trivially produced
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        if len(r.continuation):
            by_length.setdefault(len(r.continuation), []).append(i)
    for L, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids, attention = left_pad([list(requests[i].context) for i in chunk], pad_id=0)
            out = greedy_sample(model, ids.to(device), attention.to(device), L, cfg_scale, mask_id, block_length,
                                guidance)
            for row, i in enumerate(chunk):
                result[i] = out[row, ids.shape[1]:].tolist() == list(requests[i].continuation)
    return result


def greedy_sample(model, ids: torch.Tensor, attention: torch.Tensor, L: int, cfg_scale: float, mask_id: int,
                  block_length: int | None, guidance: str | Guidance = DEFAULT) -> torch.Tensor:
    """The sampler at temperature 0, one token per step, L tokens: one block of L (LLaDA), or
    blocks of `block_length` decoded one token per step (block diffusion)."""
    if block_length is not None:
        # gen_length >= block_length keeps the public step cap (gen_length // minimal_topk) above one
        # token per step, where the canvas (whole blocks) still fits the context
        limit, width = context_length(model), ids.shape[1]
        longer = max(L, block_length)
        fits = limit is None or -(-(width + longer) // block_length) * block_length <= limit
        out = block_generate(model, ids, attention_mask=attention, gen_length=longer if fits else L,
                             block_length=block_length, steps=block_length, threshold=None, cfg_scale=cfg_scale,
                             mask_id=mask_id, guidance=guidance)
        return out[:, :width + L]
    return generate(model, ids, attention_mask=attention, steps=L, gen_length=L, block_length=L, temperature=0.0,
                    cfg_scale=cfg_scale, mask_id=mask_id, guidance=guidance)


def rolling_windows(n: int, max_len: int) -> list[tuple[int, int, int]]:
    """Split a document of n tokens into (context_start, start, end) windows for `document_bound`.

    A document that fits is one window without context. A longer one is a first window of
    `max_len` tokens, then windows of max_len // 2 tokens, each conditioned on the tokens just
    before it so that context + window = max_len. Every token is scored exactly once.
    """
    if n <= max_len:
        return [(0, 0, n)]
    stride = max(1, max_len // 2)
    windows = [(0, 0, max_len)]
    start = max_len
    while start < n:
        end = min(start + stride, n)
        windows.append((max(0, end - max_len), start, end))
        start = end
    return windows


def document_bound(model, ids: Sequence[int], *, cfg_scale: float = 0.0, mode: str = "mc", mc_num: int = 128,
                   batch_size: int = 32, mask_id: int | None = None, seed: int = 0,
                   max_len: int | None = None, block_length: int | None = None,
                   guidance: str | Guidance = DEFAULT) -> Estimate:
    """Whole-document bound (perplexity, lm-eval's loglikelihood_rolling): the sum of the window
    bounds of `rolling_windows`, like an AR model's rolling windows with truncated context.
    Guidance only acts on windows that have preceding text as context."""
    max_len = max_len or context_length(model) or len(ids)
    ids = list(ids)
    requests = [Request(ids[c:s], ids[s:e], seed * 1_000_003 + k)
                for k, (c, s, e) in enumerate(rolling_windows(len(ids), max_len))]
    scored = score_requests(model, requests, cfg_scales=[cfg_scale], mode=mode, mc_num=mc_num,
                            batch_size=batch_size, mask_id=mask_id, block_length=block_length, guidance=guidance)
    parts = [per_scale[0] for per_scale in scored]
    return Estimate(sum(p.value for p in parts), math.sqrt(sum(p.stderr ** 2 for p in parts)),
                    sum(p.n for p in parts))
