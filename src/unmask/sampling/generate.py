"""The masked-diffusion sampler: the reference algorithm (the `generate` of the LLaDA model
cards), batched and without its defects.

The canvas is [prompt | gen_length × MASK]. The generated part is split into blocks decoded left
to right; within a block, each step runs the model (guided when cfg_scale > 0), proposes a token
for every masked position, and commits the k most confident ones (k from `transfer_schedule`);
the rest stay masked. At batch 1, temperature 0, 'low_confidence', the output is token-identical
to the reference.

What differs from the public code, on purpose:
- prompts of different lengths are left-padded with an attention mask; padding is never attended
  to and never committed, so each row equals its prompt run alone;
- CFG works with or without an attention mask;
- the vocabulary projection and softmax run only over the positions that can still be committed
  (from the first masked position to the end of the current block), not the whole canvas;
- EOS handling: `suppress_tokens` never proposes the given ids; `eos_last` gives EOS/end-of-turn
  the lowest confidence at any temperature, so they are decided last; `stop_at_eos` ends a row
  once its text has ended (an EOS with nothing masked before it) and fills the rest with EOS.
Masks inside the prompt are positions to fill (infilling), as in the reference: they compete for
the same per-step budget as the current block from the first step on.

Opt-in fast modes (docs/fast-sampling.md), off by default so the default stays exact: an
approximate KV cache refreshed per block (`cache='prefix'|'dual'`), parallel decoding that
commits every confident position (`threshold`, `factor`), and `compile`. Rows with nothing left
to commit drop out of the forward passes in every mode (batch rows are independent, so this
changes no output).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.transformer import KVCache
from .cuda_graph import graphed
from .guidance import DEFAULT, Guidance, Guided, branch_logits, forward_logits, guided_logits, unmasked_fraction
from .noise import forbid_tokens, propose_tokens
from .options import SamplerOptions
from .remasking import parallel_counts, select_top, token_confidence
from .schedule import transfer_schedule
from .vocab_parallel import take_rows


@dataclass
class StepState:
    """Handed to `callback` after every step (for visualisation and streaming); do not modify."""

    step: int                    # global step index, from 0
    block: int                   # block index, from 0
    x: torch.Tensor              # (B, T) canvas after this step
    committed: torch.Tensor      # (B, T) bool: positions committed at this step
    confidence: torch.Tensor     # (B, T) float: score of each proposal this step (nan where none)
    prompt_length: int           # canvas columns before the generated part


@dataclass
class GenerationOutput:
    sequences: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)
    forward_passes: int = 0
    steps: int = 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch token lists of different lengths: (ids, attention_mask), padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


def special_ids(model, name: str, given: int | None) -> int | None:
    return given if given is not None else getattr(getattr(model, "config", None), name, None)


def resolve_mask_id(model, given: int | None) -> int:
    """`given`, else the model config's mask id; an error when neither exists."""
    mask_id = special_ids(model, "mask_token_id", given)
    if mask_id is None:
        raise ValueError("the model config has no mask_token_id: pass mask_id")
    return mask_id


def stop_token_ids(eos_token_id: int | None, eot_token_id: int | None, needed: bool, device) -> torch.Tensor:
    """The EOS/EOT ids as a tensor; an error when they are `needed` (eos_last, stop_at_eos) and there are none."""
    ids = torch.tensor([i for i in (eos_token_id, eot_token_id) if i is not None], dtype=torch.long, device=device)
    if needed and ids.numel() == 0:
        raise ValueError("eos_last/stop_at_eos need an EOS id: the model config has none, pass eos_token_id")
    return ids


def ended_rows(gen: torch.Tensor, mask_id: int, stop_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose generated text has ended: an EOS/EOT with nothing masked before it.

    Returns (ended (B,) bool, first end position (B,) long; gen_length where none)."""
    L = gen.shape[1]
    cols = torch.arange(L, device=gen.device).expand_as(gen)
    is_stop = torch.isin(gen, stop_ids)
    first_stop = torch.where(is_stop, cols, L).min(1).values
    first_mask = torch.where(gen == mask_id, cols, L).min(1).values
    return (first_stop < L) & (first_mask > first_stop), first_stop


def unmasking_scores(guided: Guided, proposal: torch.Tensor, rule: str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The remasking rule's score of each position, which decides what is committed: that of the
    proposal under the guided logits, or, for a normalised form, that of the conditional model's
    own top token under its logits (the unguided rate; `unmask.sampling.guidance`)."""
    if not guided.normalized:
        return token_confidence(guided.logits, proposal, rule, generator)
    return token_confidence(guided.rate, propose_tokens(guided.rate, 0.0), rule, generator)


def never_proposed(suppress_tokens: list[int] | None, mask_id: int, options: SamplerOptions,
                   device) -> torch.Tensor:
    """The ids a step never proposes: `suppress_tokens`, and under parallel decoding the mask itself.

    Why the mask: guided logits can rank the mask token first (uncond + (w + 1)(cond - uncond) moves
    it as any other id). The reference proposes it then, and the "committed" position stays masked;
    a fixed schedule moves on and ends anyway, but a threshold/factor block runs until no mask is
    left, so a row whose best proposal is the mask would never end.
    """
    ids = list(suppress_tokens or []) + ([mask_id] if options.parallel else [])
    return torch.tensor(ids, dtype=torch.long, device=device)


def choose_tokens(guided: Guided, candidates: torch.Tensor, options: SamplerOptions,
                  generator: torch.Generator | None, suppressed: torch.Tensor, last_ids: torch.Tensor | None,
                  counts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's decision over a window: (proposal, confidence, chosen), each (B, W).

    `guided` holds the (guided) logits (B, W, V) of the window and those that score the positions
    (`unmasking_scores`), `candidates` (B, W) the positions that may be committed. `last_ids`
    (eos_last) get the lowest confidence so they are decided last; `counts` (B,) is the schedule's
    count for this step, None for parallel decoding (the options' threshold/factor). Shared by `generate` and the row stepper (rows.py), so a row stepped on
    its own draws exactly what `generate` draws for it.
    """
    if suppressed.numel():
        guided = guided.apply(lambda logits: forbid_tokens(logits, suppressed))
    proposal = propose_tokens(guided.logits, options.temperature, generator)
    confidence = unmasking_scores(guided, proposal, options.remasking, generator)
    if last_ids is not None:
        confidence = confidence.masked_fill(torch.isin(proposal, last_ids), torch.finfo(confidence.dtype).min)
    confidence = confidence.masked_fill(~candidates, float("-inf"))
    if counts is None:
        counts = parallel_counts(confidence, options.threshold, options.factor)
    return proposal, confidence, select_top(confidence, counts)


def fill_ended(gen: torch.Tensor, mask_id: int, stop_ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """`gen` (B, L) with every position after an ended text's first EOS/EOT set to `eos_id` (stop_at_eos)."""
    ended, first_stop = ended_rows(gen, mask_id, stop_ids)
    if not ended.any():
        return gen
    cols = torch.arange(gen.shape[1], device=gen.device)
    fill = ended[:, None] & (cols[None] > first_stop[:, None])
    return gen.masked_fill(fill, eos_id if eos_id is not None else int(stop_ids[0]))


def compiled(model, backend: bool | str):
    """`torch.compile(model)`, built once per model and backend (compiling is the slow part).

    The compiled module is kept in the model's __dict__, not as a submodule, so state_dict() and
    parameters() are unchanged. Shapes are dynamic: the window and the prefix-cache span change
    length from step to step.
    """
    if not backend:
        return model
    backend = "inductor" if backend is True else backend
    per_backend = model.__dict__.setdefault("_unmask_compiled", {})
    if backend not in per_backend:
        per_backend[backend] = torch.compile(model, backend=backend, dynamic=True)
    return per_backend[backend]


@dataclass
class BlockCache:
    """The KV cache of the current block, for the canvas rows it holds.

    With CFG the cache holds 2n rows: the n conditional rows, then their unconditional twins.
    With `reuse_uncond` it holds the n conditional rows only, and `uncond` keeps the unconditional
    logits of the refresh for columns [uncond_start, block end).
    Rows only leave within a block (a row with nothing left to commit), so `keep` is a subset.
    """

    kv: KVCache
    rows: torch.Tensor   # (n,) canvas rows held, ascending
    guided: bool
    uncond: torch.Tensor | None = None
    uncond_start: int = 0

    def keep(self, rows: torch.Tensor) -> None:
        if rows.numel() == self.rows.numel():
            return
        index = torch.searchsorted(self.rows, rows)
        if self.uncond is not None:
            self.uncond = take_rows(self.uncond, index)
        if self.guided:
            index = torch.cat([index, index + self.rows.numel()])
        self.kv.select_rows(index)
        self.rows = rows


def fresh_cache(model, rows: int) -> KVCache:
    """An empty cache for `model`; the first pass allocates it for however many rows it runs."""
    return KVCache(model.config.n_layers)


def cached_logits(runner, block_cache: BlockCache | None, refresh: bool, new_cache: Callable[[int], KVCache],
                  x: torch.Tensor, rows: torch.Tensor, prompt_index: torch.Tensor, mask_id: int, cfg_scale: float,
                  attention_mask: torch.Tensor | None, window: slice, span: slice,
                  reuse_uncond: bool, guidance: Guidance = DEFAULT,
                  t: torch.Tensor | None = None, skip_idle: bool = True) -> tuple[Guided, BlockCache]:
    """One cached step's `Guided` logits over `window`, and the block cache it leaves.

    At a refresh the whole canvas runs into a new cache (`new_cache(n_rows)`); otherwise `span` runs
    against the cache. With `reuse_uncond` and guidance, a refresh computes both branches, keeps the
    unconditional logits and moves the conditional rows to a cache of their own; the steps after it
    run the conditional rows only and mix with the kept unconditional logits (at each step's weight,
    so a schedule still moves). Without reuse_uncond, a step between refreshes at which the schedule
    gives every row weight 0 runs the conditional rows alone, against their half of the cache (the
    unconditional half is refilled over the span at its next step, so nothing goes stale);
    `skip_idle=False` keeps the batch fixed (a CUDA graph replays one shape).
    """
    guided = cfg_scale > 0
    if refresh:
        block_cache = BlockCache(new_cache(rows.numel() * (2 if guided else 1)), rows, guided)
    else:
        block_cache.keep(rows)
    if not (reuse_uncond and guided):
        if guided and skip_idle and not refresh and guidance.all_idle(cfg_scale, t):
            cond = forward_logits(runner, x, attention_mask, window, block_cache.kv.head_rows(rows.numel()), span)
            return guidance.step(cond, None, cfg_scale, t), block_cache
        return guided_logits(runner, x, prompt_index, mask_id, cfg_scale, attention_mask, window,
                             block_cache.kv, span, guidance, t), block_cache
    if refresh:
        cond, uncond = branch_logits(runner, x, prompt_index, mask_id, attention_mask, window, block_cache.kv, span,
                                     guidance)
        conditional = new_cache(rows.numel())
        conditional.copy_rows(block_cache.kv, torch.arange(rows.numel(), device=rows.device))
        block_cache = BlockCache(conditional, rows, False, uncond, window.start)
        return guidance.step(cond, uncond, cfg_scale, t), block_cache
    cond = forward_logits(runner, x, attention_mask, window, block_cache.kv, span)
    uncond = block_cache.uncond[:, window.start - block_cache.uncond_start:]
    return guidance.step(cond, uncond, cfg_scale, t), block_cache


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    *,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    suppress_tokens: list[int] | None = None,
    eos_last: bool = False,
    stop_at_eos: bool = False,
    eos_token_id: int | None = None,
    eot_token_id: int | None = None,
    callback: Callable[[StepState], None] | None = None,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
    cache: str | None = None,
    cache_refresh: str | int = "block",
    threshold: float | None = None,
    factor: float | None = None,
    reuse_uncond: bool = False,
    cuda_graph: bool = False,
    compile: bool | str = False,
    guidance: str | Guidance = DEFAULT,
):
    """Sample `gen_length` tokens after `prompt` (B, P); returns the canvas (B, P + gen_length).

    Keyword names follow the reference `generate`, so scripts port by changing the import.
    attention_mask (B, P): 1 for prompt tokens, 0 for left padding (see `left_pad`).
    generator: a torch.Generator for reproducible sampling (temperature > 0, 'random').
    suppress_tokens: ids never proposed (e.g. [eos] to force the full length).
    eos_last / stop_at_eos: see the module docstring; EOS/EOT ids default to the model config's.
    callback(StepState) after every step; output_history keeps every canvas (on the CPU).
    return_dict_in_generate: return a GenerationOutput (sequences, history, forward_passes, steps).

    Fast options (all off by default; off, the output is the exact reference algorithm's):
    cache: None | 'prefix' | 'dual' — approximate KV cache (Fast-dLLM). At each refresh the whole
      canvas runs and fills the cache; the other steps run only [block start, end) ('prefix') or
      the block alone ('dual') against it. The prompt is treated as fixed (no infilling masks).
    cache_refresh: 'block' (refresh at each block start) or N (also every N steps within a block).
    threshold τ / factor f: parallel decoding; each step commits the positions chosen by
      `parallel_counts` (at least one) instead of the schedule's count, and a block takes as many
      steps as it needs, so `steps` is unused.
    reuse_uncond: with a cache and CFG, compute the unconditional branch only at cache refreshes and
      reuse its logits until the next one: CFG then costs one extra row per refresh, not per step.
    cuda_graph: with cache='dual' on a GPU, replay the block step as a CUDA graph (cuda_graph.py);
      the same tokens as without it, up to kernel rounding. Rows do not drop out. With `compile`
      the graph captures the compiled kernels.
    compile: True (inductor) or a torch.compile backend name: compile the per-step forward.
      Meant for GPUs; the first calls pay the compilation.
    Rows with nothing left to commit in the current block (a finished block, or a text ended by
    stop_at_eos) drop out of the forward passes.
    guidance: the form of CFG when cfg_scale > 0 (a `Guidance` or its spec, e.g. "linear",
      "span:0:-4", "acfg:0.7"; see `unmask.sampling.guidance` and docs/guidance.md). The default is
      the seed's: constant weight, whole prompt masked.
    """
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    options = SamplerOptions(steps=steps, gen_length=gen_length, block_length=block_length,
                             temperature=temperature, cfg_scale=cfg_scale, remasking=remasking, cache=cache,
                             cache_refresh=cache_refresh, threshold=threshold, factor=factor,
                             reuse_uncond=reuse_uncond, cuda_graph=cuda_graph, compile=compile,
                             guidance=guidance).check()
    form = options.form
    mask_id = resolve_mask_id(model, mask_id)
    B, P = prompt.shape
    parallel, per_block = options.parallel, options.steps_per_block
    device = prompt.device
    eos_token_id = special_ids(model, "eos_token_id", eos_token_id)
    eot_token_id = special_ids(model, "eot_token_id", eot_token_id)
    stop_ids = stop_token_ids(eos_token_id, eot_token_id, eos_last or stop_at_eos, device)

    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(device).long(),
                                    torch.ones((B, gen_length), dtype=torch.long, device=device)], dim=1)
        valid = attention_mask.bool()
    else:
        valid = torch.ones_like(x, dtype=torch.bool)
    prompt_index = (x != mask_id) & valid
    generated = valid & ~prompt_index   # what guidance schedules count as the text (infilling masks included)
    options.check_for_model(model, P, mask_id, prompt_masked=bool(((x[:, :P] == mask_id) & valid[:, :P]).any()))
    suppressed = never_proposed(suppress_tokens, mask_id, options, device)
    runner = graphed(model, compiled(model, compile)) if cuda_graph else compiled(model, compile)
    if cuda_graph:  # the graphs' caches live across blocks and calls
        new_cache = functools.partial(runner.kv_cache, total=x.shape[1])
    else:
        new_cache = functools.partial(fresh_cache, model)
    all_rows = torch.arange(B, device=device)

    out = GenerationOutput(sequences=x)
    step = 0
    for block in range(gen_length // block_length):
        block_start, block_end = P + block * block_length, P + (block + 1) * block_length
        if per_block is not None:
            schedule = transfer_schedule((x[:, block_start:block_end] == mask_id).sum(1), per_block)
        block_cache = None
        for i in range(per_block) if per_block is not None else itertools.count():
            candidates = (x == mask_id) & valid
            candidates[:, block_end:] = False
            rows = candidates.any(1).nonzero().squeeze(1)  # rows with something left to commit
            if rows.numel() == 0:
                break
            if cuda_graph:  # a graph's batch size is fixed
                rows = all_rows
            start = int(candidates.any(0).nonzero()[0])
            window = slice(start, block_end)
            xa, candidates = x[rows], candidates[rows]
            mask_a = None if attention_mask is None else attention_mask[rows]
            t = unmasked_fraction(xa, generated[rows], mask_id) if form.scheduled else None   # a schedule's clock
            if cache is None:
                guided = guided_logits(runner, xa, prompt_index[rows], mask_id, cfg_scale, mask_a, window,
                                       guidance=form, t=t)
            else:
                refresh = block_cache is None or (cache_refresh != "block" and i % cache_refresh == 0)
                if refresh:  # the whole canvas runs and fills a fresh cache
                    span = slice(0, x.shape[1])
                else:
                    span = slice(block_start, x.shape[1] if cache == "prefix" else block_end)
                guided, block_cache = cached_logits(runner, block_cache, refresh, new_cache, xa, rows,
                                                    prompt_index[rows], mask_id, cfg_scale, mask_a, window,
                                                    span, reuse_uncond, form, t, skip_idle=not cuda_graph)
            out.forward_passes += 2 if cfg_scale > 0 and form.canvas.adaptive else 1   # A-CFG: two calls in sequence
            proposal, confidence, chosen = choose_tokens(guided, candidates[:, window], options, generator, suppressed,
                                                         stop_ids if eos_last else None,
                                                         None if parallel else schedule[rows, i])
            xa[:, window] = torch.where(chosen, proposal, xa[:, window])
            x[rows] = xa
            if stop_at_eos:
                x[:, P:] = fill_ended(x[:, P:], mask_id, stop_ids, eos_token_id)
            if callback is not None:
                committed = torch.zeros_like(x, dtype=torch.bool)
                committed[rows, window] = chosen
                full_conf = torch.full(x.shape, float("nan"), device=device)
                full_conf[rows, window] = confidence.float().masked_fill(confidence == float("-inf"), float("nan"))
                callback(StepState(step, block, x, committed, full_conf, P))
            if output_history:
                out.history.append(x.cpu().clone())
            step += 1
        if stop_at_eos and ended_rows(x[:, P:], mask_id, stop_ids)[0].all():
            break
    out.steps = step
    return out if return_dict_in_generate else x
