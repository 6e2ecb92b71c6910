"""Block diffusion: how LLaDA2.x models decode, with an exact cache and unsupervised CFG.

A block-diffusion model attends bidirectionally inside a block of `block_length` tokens and
causally across blocks: a token at position i sees position j iff ⌊j/b⌋ ≤ ⌊i/b⌋. So it decodes
like an autoregressive model over blocks, and the keys/values of a finished block never change.

The public algorithm (LLaDA2's `generate`), reproduced token for token at batch 1:
- blocks sit at absolute positions: the canvas is the prompt followed by masks up to a whole
  number of blocks, ⌈(P + gen_length) / b⌉ · b; blocks inside the prompt are skipped and the block
  holding the prompt's end is decoded with its prompt tokens fixed;
- block k sees the window [0, (k + 1) · b) with positions 0.. (later blocks are not fed);
- a block takes at most `steps` steps (steps = min(steps, gen_length // minimal_topk)); the
  schedule splits b into `steps` counts (b // steps each, the first b % steps one more). At each
  step every masked position of the block gets a proposal (argmax, or a sample under
  temperature/top_k/top_p) scored by its probability; if at least the step's count n of them
  score above `threshold`, all of those are committed, else the n best (or what is left). A block
  ends when it has no mask left;
- EOS: with `eos_early_stop`, a step that commits an EOS ends generation once everything before
  the first EOS is decoded; after each block, an EOS anywhere in the generated text ends it.

What unmask adds, none of it changing a token:
- an exact KV cache (`cache=True`, the default): a block's first step runs the previous block
  (now final) and the current one against the cache, later steps the current block alone, so
  finished blocks never run again and the number of forward passes is the public code's;
- batches of prompts of different lengths, given left-padded with an attention mask (as for
  `unmask.generate`): each row is decoded on its own block grid, exactly as if run alone;
- unsupervised CFG (`cfg_scale` w > 0): the unconditional branch is the same canvas with every
  prompt token replaced by the mask token (or the span of the prompt that `guidance` names),
  under the same block-causal mask and the same positions, with its own rows in the cache; logits
  mix as uncond + (w + 1)(cond − uncond) before proposals and scores, w following the guidance
  schedule over each row's fraction of the text unmasked (a step at which it gives every row
  weight 0 runs no unconditional rows). Masks written over the prompt are not candidates: only the conditional
  canvas's generated positions are decoded. `reuse_uncond` runs the unconditional rows only at a
  block's first step and reuses their logits for the block's other steps.
The output is `(B, P + gen_length)` like `unmask.generate`: each row's text, cut after its first
EOS, with EOS filling the rest (the public code returns the cut row itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.transformer import KVCache
from . import vocab_parallel
from .generate import GenerationOutput, StepState, resolve_mask_id, special_ids
from .guidance import DEFAULT, Guidance, Guided, is_native, same_rows, unmasked_fraction
from .options import BlockOptions, OptionError


BLOCK_DIFFUSION_LAYOUTS = ("llada2_moe",)


def is_block_diffusion(model) -> bool:
    """Whether `model` is a block-diffusion model (LLaDA2.x), native or loaded with remote code."""
    cfg = getattr(getattr(model, "_orig_mod", model), "config", None)
    return (getattr(cfg, "layout", None) or getattr(cfg, "model_type", None)) in BLOCK_DIFFUSION_LAYOUTS


def is_block_checkpoint(path) -> bool:
    """Whether the checkpoint at `path` holds a block-diffusion model, from its config.json alone
    (so options can be checked before the weights load)."""
    from ..models import CheckpointError, read_json, resolve_checkpoint_dir

    try:
        return read_json(resolve_checkpoint_dir(path) / "config.json").get("model_type") in BLOCK_DIFFUSION_LAYOUTS
    except CheckpointError:   # no readable config: the load that follows says what is wrong
        return False


def block_causal_mask(length: int, block_length: int, device=None) -> torch.Tensor:
    """(length, length) bool, True where query i may attend key j: ⌊j/b⌋ ≤ ⌊i/b⌋."""
    block = torch.arange(length, device=device) // block_length
    return block[None, :] <= block[:, None]


def padded_block_causal(attention_mask: torch.Tensor, block_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, W, W) bool mask and (B, W) positions for left-padded rows (attention_mask (B, W), 1 = token):
    positions count each row's own tokens from 0, blocks are cut at those positions, and padding is
    never attended (scoring a block-diffusion model on a padded batch)."""
    real = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    block = positions // block_length
    return (real[:, None, :] & (block[:, None, :] <= block[:, :, None]))[:, None], positions


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, their probabilities) for logits (..., V): argmax of the softmax at temperature 0,
    else a sample from softmax(logits / T) restricted to the top_k tokens and the top_p mass.
    Vocabulary-sharded logits (tensor parallelism): the argmax from the ranks' maxima; a sample from
    the gathered logits (top_k, top_p and the multinomial draw need the whole distribution), drawn
    on every rank from the same generator, so every rank and one process draw the same tokens."""
    logits = logits.float()
    if vocab_parallel.is_vocab_sharded(logits):
        if temperature == 0:
            return vocab_parallel.greedy_tokens(logits)
        logits = logits.full_tensor()
    if temperature == 0:
        probs = F.softmax(logits, dim=-1)
        confidence, tokens = probs.max(-1)
        return tokens, confidence
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        mass_before = F.softmax(sorted_logits, dim=-1).cumsum(-1) - F.softmax(sorted_logits, dim=-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before > top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def threshold_commit(confidence: torch.Tensor, count: int, threshold: float | None) -> torch.Tensor:
    """(B, b) bool: which candidates to commit at a step whose schedule count is `count`.

    confidence holds −inf at non-candidates. Every candidate above `threshold` when at least
    `count` are, else the `count` most confident (fewer when fewer candidates are left)."""
    candidates = confidence > float("-inf")
    chosen = torch.zeros_like(candidates)
    if threshold is not None:
        above = candidates & (confidence > threshold)
        enough = above.sum(-1) >= count
        chosen = torch.where(enough[:, None], above, chosen)
    else:
        enough = torch.zeros(confidence.shape[0], dtype=torch.bool, device=confidence.device)
    if count > 0:
        top = confidence.topk(min(count, confidence.shape[-1]), dim=-1).indices
        best = torch.zeros_like(candidates).scatter(-1, top, True) & candidates
        chosen = torch.where(enough[:, None], chosen, best)
    return chosen


@dataclass
class _Rows:
    """The batch, left-aligned: row r's prompt at columns [0, P_r), its own block grid from 0."""

    x: torch.Tensor              # (B, W) canvas, W = the widest row's whole blocks
    prompt_lengths: torch.Tensor  # (B,)
    first_block: torch.Tensor    # (B,) the block holding the prompt's end
    last_block: torch.Tensor     # (B,) the block holding position P_r + gen_length − 1
    end: torch.Tensor            # (B,) where the row's text ends (exclusive); −1 while running


def _left_aligned(prompt: torch.Tensor, attention_mask: torch.Tensor | None, gen_length: int, block_length: int,
                  mask_id: int) -> _Rows:
    B, P = prompt.shape
    lengths = (attention_mask.long().sum(1) if attention_mask is not None
               else torch.full((B,), P, dtype=torch.long, device=prompt.device))
    totals = (lengths + gen_length + block_length - 1) // block_length * block_length
    x = torch.full((B, int(totals.max())), mask_id, dtype=torch.long, device=prompt.device)
    for r in range(B):
        n = int(lengths[r])
        x[r, :n] = prompt[r, P - n:]
    return _Rows(x, lengths, lengths // block_length, (lengths + gen_length - 1) // block_length,
                 torch.full((B,), -1, dtype=torch.long, device=prompt.device))


@dataclass
class _Branch:
    """The conditional or the unconditional rows' exact cache: which canvas rows it holds and how
    many leading columns are final in it."""

    unconditional: bool
    kv: KVCache | None = None
    rows: torch.Tensor | None = None
    cached_to: int = 0


class _Runner:
    """Forward passes of the block loop over the window [0, end) of the rows `run`.

    Without a cache every step runs the whole window, as the public code does. With it, a block's
    first step runs [cached_to, end): the blocks finished since the last pass (final now, and
    unaffected by anything after them) and the current block; later steps run the current block
    alone. The two CFG branches keep separate caches, so `reuse_uncond` can skip one of them."""

    def __init__(self, model, rows: _Rows, opts: BlockOptions, mask_id: int, cache: bool):
        self.model, self.rows, self.opts, self.mask_id, self.cache = model, rows, opts, mask_id, cache
        W = rows.x.shape[1]
        self.mask = block_causal_mask(W, opts.block_length, rows.x.device)
        self.positions = torch.arange(W, device=rows.x.device)
        self.branches = (_Branch(False), _Branch(True))
        self.kept_uncond: torch.Tensor | None = None     # reuse_uncond: the block's first-step logits
        self.kept_rows: torch.Tensor | None = None

    def logits(self, run: torch.Tensor, block: int, first_step: bool) -> Guided:
        """`Guided` (or plain) logits (n, b, V) of the rows `run` over block `block`'s columns.

        The unconditional rows run at every step, with `reuse_uncond` at a block's first step only,
        and not at all at a step where the schedule gives every row weight 0 (their logits would go
        unused; a skipped branch's cache catches up at its next pass)."""
        w = self.opts.cfg_scale
        cond = self._forward(self.branches[0], run, block)
        if w == 0:
            return Guided(cond)
        form, t = self.opts.form, self._unmasked_fraction(run)
        if self.opts.reuse_uncond and not first_step:
            uncond = vocab_parallel.take_rows(self.kept_uncond, torch.searchsorted(self.kept_rows, run))
        elif not self.opts.reuse_uncond and form.all_idle(w, t):
            uncond = None
        else:
            uncond = self._forward(self.branches[1], run, block)
            self.kept_uncond, self.kept_rows = uncond, run
        return form.step(cond, uncond, w, t)

    def _columns_before(self, run: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(n, W) bool: the columns before each row's prompt end (+ offset)."""
        cols = torch.arange(self.rows.x.shape[1], device=self.rows.x.device)
        return cols[None, :] < self.rows.prompt_lengths[run][:, None] + offset

    def _unmasked_fraction(self, run: torch.Tensor) -> torch.Tensor | None:
        """(n,) the fraction of each row's text unmasked, the guidance schedule's clock; None under
        the constant schedule, which reads no clock."""
        if not self.opts.form.scheduled:
            return None
        text = self._columns_before(run, self.opts.gen_length) & ~self._columns_before(run)
        return unmasked_fraction(self.rows.x[run], text, self.mask_id)

    def _canvas(self, branch: _Branch, run: torch.Tensor) -> torch.Tensor:
        x = self.rows.x[run]
        if not branch.unconditional:
            return x
        return self.opts.form.unconditional(x, self._columns_before(run), self.mask_id)

    def _forward(self, branch: _Branch, run: torch.Tensor, block: int) -> torch.Tensor:
        """The branch's logits over the block for the rows `run`. Where every row's unconditional
        canvas is the same (left-aligned and masked whole, any prompts are, until text is written)
        and the branch starts from nothing, one row runs and its logits and cache are copied."""
        x = self._canvas(branch, run)
        if branch.unconditional and run.numel() > 1 and (not self.cache or branch.kv is None) and same_rows(x, None):
            copies = torch.zeros(run.numel(), dtype=torch.long, device=x.device)
            logits = self._pass(branch, run, x[:1], block)
            if self.cache:
                branch.kv.select_rows(copies)
            return vocab_parallel.take_rows(logits, copies)
        return self._pass(branch, run, x, block)

    def _pass(self, branch: _Branch, run: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
        """One forward pass of canvas rows x for the rows `run`: without a cache the window [0, block
        end); with it, the columns since the branch's cache ends (the blocks finished since its last
        pass, and the current one), against the cache."""
        b, n = self.opts.block_length, x.shape[0]
        start, end = block * b, (block + 1) * b
        if not self.cache:
            mask = self.mask[:end, :end].expand(n, 1, end, end)
            positions = self.positions[:end].expand(n, end)
            if not is_native(self.model):   # the checkpoint's own code: no logits_slice
                return self.model(x[:, :end], attention_mask=mask, position_ids=positions).logits[:, start:end]
            return self.model(x[:, :end], attention_mask=mask, position_ids=positions,
                              logits_slice=slice(start, end)).logits
        self._keep_rows(branch, run)
        span = slice(branch.cached_to, end)
        mask = self.mask[span].expand(n, 1, span.stop - span.start, self.mask.shape[1])
        logits = self.model(x[:, span], attention_mask=mask, position_ids=self.positions[span].expand(n, -1),
                            kv_cache=branch.kv, cache_start=span.start,
                            logits_slice=slice(start - span.start, None)).logits
        branch.cached_to = start
        return logits

    def _keep_rows(self, branch: _Branch, run: torch.Tensor) -> None:
        """The cache holds exactly the rows `run`: created on the first pass, rows only leave."""
        if branch.kv is None:
            branch.kv = KVCache(len(self.model.blocks), capacity=self.rows.x.shape[1])
        elif run.numel() != branch.rows.numel():
            branch.kv.select_rows(torch.searchsorted(branch.rows, run))
        branch.rows = run


@torch.no_grad()
def block_generate(
    model,
    prompt: torch.Tensor,
    *,
    gen_length: int = 2048,
    block_length: int = 32,
    steps: int = 32,
    threshold: float | None = 0.95,
    minimal_topk: int = 1,
    eos_early_stop: bool = False,
    eos_id: int | None = None,
    mask_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 0.0,
    reuse_uncond: bool = False,
    guidance: str | Guidance = DEFAULT,
    cache: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback=None,
    return_dict_in_generate: bool = False,
):
    """Decode `gen_length` tokens after `prompt` (B, P) block by block; returns (B, P + gen_length).

    Keyword names and meanings are the public LLaDA2 `generate`'s (`steps` is per block), plus
    cfg_scale / reuse_uncond / guidance (the form, as for `unmask.generate`), cache (the exact cache of finished blocks; default: on for
    unmask's own models, off for models loaded with trust_remote_code, which take no cache),
    attention_mask (left padding, as for `unmask.generate`), generator, callback(StepState) and
    return_dict_in_generate. eos_id and mask_id default to the model config's.
    """
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    opts = BlockOptions(gen_length=gen_length, block_length=block_length, steps=steps, threshold=threshold,
                        minimal_topk=minimal_topk, temperature=temperature, top_k=top_k, top_p=top_p,
                        cfg_scale=cfg_scale, reuse_uncond=reuse_uncond, guidance=guidance).check()
    mask_id = resolve_mask_id(model, mask_id)
    eos_id = special_ids(model, "eos_token_id", eos_id)
    if eos_early_stop and eos_id is None:
        raise ValueError("eos_early_stop needs an EOS id: the model config has none, pass eos_id")
    opts.check_for_model(model, prompt.shape[1], mask_id)
    if cache is None:
        cache = is_native(model)
    elif cache and not is_native(model):
        raise OptionError("cache", "cache=True needs unmask's own model (models loaded with trust_remote_code take "
                                   "no KV cache); use cache=False")
    b = block_length
    rows = _left_aligned(prompt, attention_mask, gen_length, b, mask_id)
    x = rows.x
    runner = _Runner(model, rows, opts, mask_id, cache)
    schedule = opts.schedule
    out = GenerationOutput(sequences=x)
    cols = torch.arange(x.shape[1], device=x.device)
    step = 0
    for block in range(int(rows.first_block.min()), int(rows.last_block.max()) + 1):
        start, end = block * b, (block + 1) * b
        live = (rows.end < 0) & (rows.last_block >= block)
        for i, count in enumerate(schedule):
            in_block = (x[:, start:end] == mask_id) & live[:, None]
            run = live.nonzero().squeeze(1) if cache else in_block.any(1).nonzero().squeeze(1)
            if not in_block[run].any():
                break
            guided = runner.logits(run, block, first_step=i == 0)
            tokens, confidence = sample_tokens(guided.logits, temperature, top_k, top_p, generator)
            if guided.normalized:   # the unguided rate: the conditional model's confidence in its own top token
                confidence = sample_tokens(guided.rate, 0.0, None, None, None)[1]
            candidates = in_block[run]
            confidence = confidence.masked_fill(~candidates, float("-inf"))
            chosen = threshold_commit(confidence, count, threshold)
            x[run, start:end] = torch.where(chosen, tokens, x[run, start:end])
            out.forward_passes += 1
            if eos_early_stop:
                _end_at_decoded_eos(rows, run[(chosen & (tokens == eos_id)).any(1)], eos_id, mask_id, end)
            if callback is not None:
                callback(_step_state(step, block, x, rows, prompt, gen_length, run, chosen, confidence, start, end))
            step += 1
            live = (rows.end < 0) & (rows.last_block >= block)
        finished = (rows.end < 0) & (rows.last_block >= block) & (rows.first_block <= block)
        for r in finished.nonzero().flatten().tolist():
            eos = ((x[r] == eos_id) & (cols >= rows.prompt_lengths[r]) & (cols < end)).nonzero() if eos_id is not None else []
            if len(eos):
                rows.end[r] = int(eos[0]) + 1
            elif block == int(rows.last_block[r]):
                rows.end[r] = int(rows.prompt_lengths[r]) + gen_length
        if (rows.end >= 0).all():
            break
    out.steps = step
    out.sequences = _output(rows, prompt, gen_length, eos_id, mask_id)
    return out if return_dict_in_generate else out.sequences


def _end_at_decoded_eos(rows: _Rows, candidates: torch.Tensor, eos_id: int, mask_id: int, window_end: int) -> None:
    """eos_early_stop: rows that just committed an EOS end there once everything before it is decoded."""
    for r in candidates.tolist():
        P = int(rows.prompt_lengths[r])
        length = decoded_text_end(rows.x[r, P:window_end], eos_id, mask_id)
        if length is not None:
            rows.end[r] = P + length


def decoded_text_end(text: torch.Tensor, eos_id: int, mask_id: int) -> int | None:
    """eos_early_stop's rule on a row's text so far (from the prompt's end): its length through its
    first EOS once everything before that EOS is decoded, else None (an EOS filled into the prompt
    is not text)."""
    eos = (text == eos_id).nonzero()
    if len(eos) and not (text[:int(eos[0])] == mask_id).any():
        return int(eos[0]) + 1
    return None


def _input_layout(t: torch.Tensor, rows: _Rows, width: int, gen_length: int, fill) -> torch.Tensor:
    """A left-aligned (B, W) tensor in the caller's layout (B, width + gen_length): each row's
    generated columns [P_r, P_r + gen_length) moved to [width, width + gen_length); the rest `fill`."""
    out = torch.full((t.shape[0], width + gen_length), fill, dtype=t.dtype, device=t.device)
    for r, P in enumerate(rows.prompt_lengths.tolist()):
        out[r, width:] = t[r, P:P + gen_length]
    return out


def _step_state(step: int, block: int, x: torch.Tensor, rows: _Rows, prompt: torch.Tensor, gen_length: int,
                run: torch.Tensor, chosen: torch.Tensor, confidence: torch.Tensor, start: int, end: int) -> StepState:
    """The step in the caller's layout (the input prompt, then gen_length columns)."""
    B, P = prompt.shape
    canvas = _input_layout(x, rows, P, gen_length, 0)
    canvas[:, :P] = prompt
    committed = torch.zeros_like(x, dtype=torch.bool)
    committed[run, start:end] = chosen
    scores = torch.full(x.shape, float("nan"), device=x.device)
    scores[run, start:end] = confidence.float().masked_fill(confidence == float("-inf"), float("nan"))
    return StepState(step, block, canvas, _input_layout(committed, rows, P, gen_length, False),
                     _input_layout(scores, rows, P, gen_length, float("nan")), P)


def _output(rows: _Rows, prompt: torch.Tensor, gen_length: int, eos_id: int | None, mask_id: int) -> torch.Tensor:
    """(B, P + gen_length): the input prompt (padding kept), each row's text, then EOS after its end."""
    P = prompt.shape[1]
    cols = torch.arange(rows.x.shape[1], device=rows.x.device)
    after_end = cols[None, :] >= rows.end[:, None]
    x = rows.x.masked_fill(after_end, eos_id if eos_id is not None else mask_id)
    out = _input_layout(x, rows, P, gen_length, eos_id if eos_id is not None else mask_id)
    out[:, :P] = prompt
    return out
