"""Per-row decoding state for continuous batching: every row carries its own canvas, block, step,
schedule, settings and random generator, and `step(rows)` advances each of them by one denoising
step of its own. Rows may join and leave between steps, so a server can admit a request at the
next step instead of waiting for a whole batch to finish.

The guarantee is `generate`'s: a row's text equals that request run alone through `generate`
(same options, same seed). What makes it hold:
- the decision of a step (propose, score, commit) is `generate`'s own `choose_tokens`, run on each
  row's own window with the row's own generator, so a row draws exactly the noise it would alone;
- rows of different canvas lengths share one forward pass, left-padded with an attention mask
  (padding is never attended to, positions count real tokens only), and each row reads the logits
  of its own window [first masked position, end of its block). The mask is passed even when no
  row is padded, as the server always passed one to `generate`: the attention kernel with a mask
  may round differently from the one without, and a request alone keeps the text it had;
- only guided rows add an unconditional row (their own guidance form and weight); the guided logits
  are mixed per row;
- a row's block ends after its own steps per block (or when it has nothing left to commit), and the
  row ends after its last block, or when its text has ended (stop_at_eos), as in `generate`.

What shares a pass: every row without a cache (the remasking rule, temperature, threshold/factor,
cfg scale and guidance form may all differ), unless their canvas lengths differ so much that
padding them to one width costs more than another pass (`pass_groups`, given the model's
`measure_pass_overhead`). A row guided by A-CFG (an adaptive canvas) runs its two passes on its
own, because its unconditional canvas depends on its conditional pass.

Rows in a cache mode ('prefix', 'dual'; any refresh interval, reuse_uncond) keep their own cache:
at a refresh the row's whole canvas runs and its keys/values become the row's cache; other steps
run the row's span (block to the end, or the block) against it. They share `cached_pass`es with
one another (a scratch cache stacks each row's cached columns, a per-row mask hides the span's
stale columns), and run beside the uncached rows' pass in the same step. A CUDA graph or compile
fixes a whole call's shapes, so those rows are not stepped (`steppable`); LLaDA2.x block diffusion
is stepped by `block_rows`, with the same `cached_pass`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models.transformer import KVCache
from .generate import choose_tokens, ended_rows, fill_ended, left_pad, never_proposed, stop_token_ids
from .guidance import Guided, forward_logits, guided_logits, unmasked_fraction
from .options import SamplerOptions
from .schedule import transfer_schedule


def steppable(options) -> bool:
    """Whether rows with these options can be advanced by `step`: LLaDA options without a CUDA graph
    or compile (a graph's shapes and a compiled call are fixed for a whole call)."""
    return isinstance(options, SamplerOptions) and not options.cuda_graph and not options.compile


@dataclass
class StepResult:
    """What one step did to one row (for streaming and the live view)."""

    step: int                   # the row's step index, from 0
    block: int                  # the block it decoded in
    committed: torch.Tensor     # (G,) bool over the generated part: committed at this step
    confidence: torch.Tensor    # (G,) float: each proposal's score this step (nan where none)

    @classmethod
    def of(cls, step: int, block: int, x: torch.Tensor, window: slice, chosen: torch.Tensor,
           confidence: torch.Tensor, text: slice) -> StepResult:
        """The step that committed `chosen` (1, len(window)) with scores `confidence` (−inf where
        nothing was proposed) in `window` of canvas `x`, over the canvas's `text` columns."""
        committed = torch.zeros_like(x, dtype=torch.bool)
        committed[window] = chosen[0]
        score = torch.full(x.shape, float("nan"), device=x.device)
        score[window] = confidence[0].float().masked_fill(confidence[0] == float("-inf"), float("nan"))
        return cls(step, block, committed[text], score[text])


@dataclass(eq=False)
class Row:
    """One request's decoding state. Build it with `Row.start`; `step` advances it."""

    options: SamplerOptions
    x: torch.Tensor                      # (T,) canvas: prompt, then gen_length positions
    prompt_length: int
    mask_id: int
    prompt_index: torch.Tensor           # (T,) bool: prompt tokens (the condition)
    generated: torch.Tensor              # (T,) bool: what guidance schedules count as the text
    generator: torch.Generator | None
    suppressed: torch.Tensor             # ids never proposed
    stop_ids: torch.Tensor               # EOS/EOT ids
    eos_id: int | None
    eos_last: bool = False
    stop_at_eos: bool = False
    block: int = 0                       # current block index
    block_step: int = 0                  # steps taken in the current block
    step_index: int = 0                  # steps taken in all
    schedule: torch.Tensor | None = None # (steps per block,) commits per step in the current block
    done: bool = False
    last: StepResult | None = field(default=None, repr=False)
    caches: list = field(default_factory=lambda: [None, None])   # cache modes: a RowCache per branch
    kept_uncond: torch.Tensor | None = None   # reuse_uncond: the refresh's unconditional logits
    uncond_start: int = 0                     # the column they start at

    @classmethod
    def start(cls, prompt: list[int] | torch.Tensor, options: SamplerOptions, *, mask_id: int,
              generator: torch.Generator | None = None, suppress_tokens: list[int] | None = None,
              eos_token_id: int | None = None, eot_token_id: int | None = None, eos_last: bool = False,
              stop_at_eos: bool = False, device: torch.device | str = "cpu") -> Row:
        """A row at its first step. `options` must be checked (and `steppable`); the keywords are
        `generate`'s."""
        if not steppable(options):
            raise ValueError("this row's options keep state across a whole call (cuda_graph or compile): "
                             "run it through generate")
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=device).flatten()
        P = prompt.numel()
        x = torch.cat([prompt, torch.full((options.gen_length,), mask_id, dtype=torch.long, device=device)])
        prompt_index = x != mask_id
        stop_ids = stop_token_ids(eos_token_id, eot_token_id, eos_last or stop_at_eos, device)
        row = cls(options, x, P, mask_id, prompt_index, ~prompt_index, generator,
                  never_proposed(suppress_tokens, mask_id, options, device), stop_ids, eos_token_id,
                  eos_last, stop_at_eos)
        row._begin_block()
        row._settle()
        return row

    @property
    def gen(self) -> torch.Tensor:
        """(gen_length,) the generated part of the canvas."""
        return self.x[self.prompt_length:]

    @property
    def blocks(self) -> int:
        """How many blocks the row decodes (for the live view)."""
        return self.options.gen_length // self.options.block_length

    @property
    def block_number(self) -> int:
        """Which of them it is in, from 0."""
        return self.block

    @property
    def total_steps(self) -> int | None:
        """Its steps in all; None for threshold/factor decoding, which takes what it needs."""
        return None if self.options.parallel else self.options.steps

    @property
    def block_end(self) -> int:
        return self.prompt_length + (self.block + 1) * self.options.block_length

    def candidates(self) -> torch.Tensor:
        """(T,) bool: the masked positions this step may commit (infilling masks in the prompt too)."""
        c = self.x == self.mask_id
        c[self.block_end:] = False
        return c

    @property
    def refreshes(self) -> bool:
        """Whether this step refreshes the row's cache (the whole canvas runs): at a block's first
        step, and every `cache_refresh` steps when that is a number, as `generate` does."""
        every = self.options.cache_refresh
        return self.block_step == 0 or (every != "block" and self.block_step % every == 0)

    @property
    def t(self) -> torch.Tensor | None:
        """(1,) the fraction of the row's generated positions unmasked: its guidance schedule's clock;
        None under the constant schedule, which reads no clock (so a step does not compute it)."""
        if not self.options.form.scheduled:
            return None
        return unmasked_fraction(self.x[None], self.generated[None], self.mask_id)

    @property
    def guided_now(self) -> bool:
        """Whether this step needs the row's unconditional logits: it is guided and its schedule's
        weight is not 0 now (an idle row's logits are the conditional ones, as in `generate`)."""
        return self.options.cfg_scale > 0 and not self.options.form.all_idle(self.options.cfg_scale, self.t)

    def runs(self, branch: int) -> bool:
        """Whether this step of a cached row runs the branch: the unconditional one at every refresh
        of a guided row (it fills that branch's cache), and between refreshes when the row is guided
        now, unless reuse_uncond keeps the refresh's logits."""
        if branch == 0:
            return True
        if self.options.cfg_scale <= 0:
            return False
        return self.refreshes or (not self.options.reuse_uncond and self.guided_now)

    def canvas(self, branch: int) -> torch.Tensor:
        """(T,) the conditional canvas, or the unconditional one (the guidance form's canvas)."""
        return self.x if branch == 0 else self.options.form.unconditional(self.x, self.prompt_index, self.mask_id)

    def mix(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> Guided:
        """This step's `Guided` logits from the window's conditional logits (1, W, V) and, for a
        row guided now, its unconditional ones, under its guidance form at its unmasked fraction."""
        if self.options.cfg_scale <= 0:
            return Guided(cond)
        return self.options.form.step(cond, uncond, self.options.cfg_scale, self.t)

    def cached_span(self, branch: int, window: slice, empty: RowCache) -> CachedSpan:
        """This step's part of a cached pass in a branch: the whole canvas at a refresh, else the
        current block to the end ('prefix') or the block alone ('dual') against the row's cache."""
        T, device = self.x.numel(), self.x.device
        block_start = self.block_end - self.options.block_length
        if self.refreshes:
            span, cache = slice(0, T), empty
        else:
            span = slice(block_start, T if self.options.cache == "prefix" else self.block_end)
            cache = self.caches[branch]
        cached = torch.arange(cache.columns, device=device)
        visible = (cached < span.start) | (cached >= span.stop)
        return CachedSpan(self.canvas(branch)[span], torch.arange(span.start, span.stop, device=device), cache,
                          visible, None, slice(window.start - span.start, window.stop - span.start))

    def keep_cache(self, branch: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """At a refresh, the whole canvas's fresh keys/values become the row's cache. Other steps
        keep it as it is: their span is the same until the next refresh and is always run afresh
        (its cached columns are never attended), so writing it back would change nothing."""
        if self.refreshes:
            self.caches[branch] = RowCache([k.clone() for k in keys], [v.clone() for v in values])

    def _begin_block(self) -> None:
        per_block = self.options.steps_per_block
        start = self.block_end - self.options.block_length
        if per_block is not None:
            self.schedule = transfer_schedule((self.x[start:self.block_end] == self.mask_id).sum().view(1),
                                              per_block)[0]
        self.block_step = 0

    def _settle(self) -> None:
        """Move to the next block while the current one has no step left (as `generate`'s block
        loop does); the row is done after its last block or once its text has ended."""
        per_block, blocks = self.options.steps_per_block, self.options.gen_length // self.options.block_length
        while not self.done:
            if (per_block is None or self.block_step < per_block) and self.candidates().any():
                return
            ended = self.stop_at_eos and bool(ended_rows(self.gen[None], self.mask_id, self.stop_ids)[0][0])
            if ended or self.block + 1 >= blocks:
                self.done = True
                return
            self.block += 1
            self._begin_block()

    def _decide(self, guided: Guided, window: slice, candidates: torch.Tensor) -> None:
        """Commit this step's tokens from the `Guided` logits (1, W, V) of `window`."""
        counts = None if self.options.parallel else self.schedule[self.block_step].view(1)
        proposal, confidence, chosen = choose_tokens(guided, candidates[None, window], self.options,
                                                     self.generator, self.suppressed,
                                                     self.stop_ids if self.eos_last else None, counts)
        self.x[window] = torch.where(chosen[0], proposal[0], self.x[window])
        if self.stop_at_eos:
            self.x[self.prompt_length:] = fill_ended(self.gen[None], self.mask_id, self.stop_ids, self.eos_id)[0]
        self.last = StepResult.of(self.step_index, self.block, self.x, window, chosen, confidence,
                                  slice(self.prompt_length, None))
        self.block_step += 1
        self.step_index += 1
        self._settle()


@torch.no_grad()
def step(model, rows: list[Row], pad_id: int = 0, pass_overhead: float | None = None) -> None:
    """Advance every row that is not done by one denoising step of its own (one forward pass for
    all of them, plus the extra passes of A-CFG rows). Rows are independent: each one's result is
    what `generate` gives for it alone.

    `pass_overhead`: what one more forward pass costs, in canvas tokens (`measure_pass_overhead`).
    With it, rows of very different canvas lengths run in separate passes when the padding a shared
    pass would compute costs more than the extra pass (`pass_groups`); None: one pass."""
    live = [r for r in rows if not r.done]
    adaptive = [r for r in live if r.options.cfg_scale > 0 and r.options.form.canvas.adaptive]
    cached = [r for r in live if r.options.cache is not None]
    shared = [r for r in live if r not in adaptive and r.options.cache is None]
    if cached:
        _cached_step(model, cached, pad_id, pass_overhead)
    for row in adaptive:   # its unconditional canvas needs its conditional pass first
        window, candidates = _window(row)
        guided = guided_logits(model, row.x[None], row.prompt_index[None], row.mask_id, row.options.cfg_scale,
                               torch.ones_like(row.x[None]), window, guidance=row.options.form, t=row.t)
        row._decide(guided, window, candidates)
    if pass_overhead is None:
        groups = [list(range(len(shared)))] if shared else []
    else:
        widths = [r.x.numel() for r in shared]
        groups = pass_groups(widths, [r.options.canvas_rows for r in shared], pass_overhead)
    for group in groups:
        _shared_step(model, [shared[i] for i in group], pad_id)


def _cached_step(model, rows: list[Row], pad_id: int, pass_overhead: float | None) -> None:
    """One step of rows in a cache mode ('prefix' or 'dual'), each against its own cache, exactly as
    `generate` runs the row alone: a refresh runs the whole canvas (both branches when guided), the
    other steps their span; reuse_uncond mixes the refresh's unconditional logits."""
    empty = empty_cache(model, rows[0].x.device)
    windows = {id(r): _window(r) for r in rows}
    runs = [(r, branch) for r in rows for branch in (0, 1) if r.runs(branch)]
    spans = [r.cached_span(branch, windows[id(r)][0], empty) for r, branch in runs]
    logits = {}
    for (row, branch), (out, keys, values) in zip(runs, cached_passes(model, spans, pad_id, pass_overhead)):
        logits[id(row), branch] = out[None]
        row.keep_cache(branch, keys, values)
    for row in rows:
        window, candidates = windows[id(row)]
        uncond = logits.get((id(row), 1))
        if row.options.cfg_scale > 0 and row.options.reuse_uncond:
            if row.refreshes:
                row.kept_uncond, row.uncond_start = uncond, window.start
            uncond = row.kept_uncond[:, window.start - row.uncond_start:]
        row._decide(row.mix(logits[id(row), 0], uncond), window, candidates)


def pass_groups(widths: list[int], weights: list[int], overhead: float) -> list[list[int]]:
    """Split rows into forward passes at the least cost, a pass costing `overhead` plus its padded
    canvas: (its widest canvas) x (its rows, `weights` each). Returns lists of row indices.

    Why: on a CPU a pass costs about its padded tokens, so a 32-token canvas run in a pass padded to
    a 128-token one costs four times its own; a GPU's pass costs nearly the same at any size, so
    there the overhead should be large and everything share one pass (not measured). Sorted by width, the best split is
    contiguous, found exactly by dynamic programming over the split points (n is a batch: small)."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    best = [0.0] + [float("inf")] * len(order)   # best[j]: least cost of the j narrowest rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        weight = 0
        for i in range(j - 1, -1, -1):   # the last pass holds order[i:j]; its widest is order[j - 1]
            weight += weights[order[i]]
            cost = best[i] + overhead + widths[order[j - 1]] * weight
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@torch.no_grad()
def measure_pass_overhead(model, pad_id: int = 0, width: int = 64, repeats: int = 5) -> float:
    """What one forward pass costs beyond its tokens, in canvas tokens: the fixed part `a` of a
    pass's time (a + b x tokens) over the per-token part `b`, from the fastest of `repeats` timings
    of one row and of eight rows of `width` tokens. Host work, kernel launches and small matrices
    make `a`: on the bundled model it is about 50-250 tokens on a 2-core CPU (1-2 threads); a GPU's
    pass costs nearly the same at any size, so there it should be far larger."""
    device = next(model.parameters()).device

    def seconds(rows: int) -> float:
        ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        attention = torch.ones_like(ids)
        best = float("inf")
        for _ in range(repeats + 1):   # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            forward_logits(model, ids, attention, slice(0, width))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    one, eight = seconds(1), seconds(8)
    per_token = max(eight - one, 1e-9) / (7 * width)
    return max(one / per_token - width, 0.0)


def _window(row: Row) -> tuple[slice, torch.Tensor]:
    candidates = row.candidates()
    return slice(int(candidates.nonzero()[0]), row.block_end), candidates


def _shared_step(model, rows: list[Row], pad_id: int) -> None:
    """One pass over the rows' canvases, left-padded to one width, and their unconditional twins."""
    guided = [r for r in rows if r.guided_now]
    canvases = [r.x for r in rows] + [r.canvas(1) for r in guided]
    ids, attention = left_pad([c.tolist() for c in canvases], pad_id)
    width = ids.shape[1]
    ids, attention = ids.to(rows[0].x.device), attention.to(rows[0].x.device)
    windows = [_window(r) for r in rows]
    offsets = [width - r.x.numel() for r in rows]
    lo = min(o + w.start for o, (w, _) in zip(offsets, windows))
    hi = max(o + w.stop for o, (w, _) in zip(offsets, windows))
    logits = forward_logits(model, ids, attention, slice(lo, hi))
    uncond_of = {id(r): len(rows) + k for k, r in enumerate(guided)}   # batch index of each twin
    for n, (row, offset, (window, candidates)) in enumerate(zip(rows, offsets, windows)):
        cols = slice(offset + window.start - lo, offset + window.stop - lo)   # the row's window in the logits
        uncond = logits[uncond_of[id(row)], cols][None] if id(row) in uncond_of else None
        row._decide(row.mix(logits[n, cols][None], uncond), window, candidates)


@dataclass(eq=False)
class RowCache:
    """One canvas row's own cache: keys and values of its columns [0, columns), which are also
    their positions, per layer, (H_kv, columns, head_dim) each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def columns(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class CachedSpan:
    """One canvas row's part of a `cached_pass`: the tokens it runs and the cache it attends to
    besides them."""

    ids: torch.Tensor                 # (S,) the tokens run
    positions: torch.Tensor           # (S,) their positions
    cache: RowCache
    cached_visible: torch.Tensor      # (c,) bool: the cached columns it attends to
    block_length: int | None          # attention block-causal over positions (None: bidirectional)
    logits: slice                     # the span's columns whose logits it needs


def empty_cache(model, device) -> RowCache:
    """A cache of no columns, in `model`'s shape and dtype: a row's cache before its first pass."""
    cfg = getattr(model, "_orig_mod", model).config
    zeros = torch.zeros((cfg.n_kv_heads, 0, cfg.head_dim), dtype=next(model.parameters()).dtype, device=device)
    return RowCache([zeros] * cfg.n_layers, [zeros] * cfg.n_layers)


def cached_passes(model, spans: list[CachedSpan], pad_id: int, pass_overhead: float | None) -> list[tuple]:
    """`cached_pass` over `spans`: in one pass, or split by span length when padding them to one
    width costs more than another pass (`pass_groups`, as `step` splits uncached rows)."""
    if pass_overhead is None:
        groups = [list(range(len(spans)))]
    else:
        groups = pass_groups([s.ids.numel() for s in spans], [1] * len(spans), pass_overhead)
    out: list[tuple | None] = [None] * len(spans)
    for group in groups:
        for i, result in zip(group, cached_pass(model, [spans[i] for i in group], pad_id)):
            out[i] = result
    return out


@torch.no_grad()
def cached_pass(model, spans: list[CachedSpan], pad_id: int) -> list[tuple[torch.Tensor, list, list]]:
    """One forward pass over rows that each run a span against their own cache; returns, per span,
    its logits over `span.logits` and the fresh keys and values of its columns (per layer,
    (H_kv, S, head_dim)), for the caller to keep.

    Layout of the scratch cache (n, H_kv, C + S, D): span k's cached columns at [0, c_k), padding up
    to C = max c_k, then its tokens right-aligned in the last S = max span columns. A query attends
    to exactly the keys it would alone (the visible cached columns and the span, block-causal over
    positions when asked), at its own positions; padding is never attended, and a padding query
    takes its span's first position (its output is discarded)."""
    device = spans[0].ids.device
    n, C, S = len(spans), max(s.cache.columns for s in spans), max(s.ids.numel() for s in spans)
    ids = torch.full((n, S), pad_id, dtype=torch.long, device=device)
    query_pos = torch.zeros(n, S, dtype=torch.long, device=device)
    key_pos = torch.zeros(n, C + S, dtype=torch.long, device=device)
    visible = torch.zeros(n, C + S, dtype=torch.bool, device=device)
    block = torch.full((n, 1), 1 << 30, dtype=torch.long, device=device)   # one block: bidirectional
    for k, s in enumerate(spans):
        c, length = s.cache.columns, s.ids.numel()
        ids[k, S - length:] = s.ids
        query_pos[k] = s.positions[0]
        query_pos[k, S - length:] = s.positions
        key_pos[k, :c], key_pos[k, C:] = torch.arange(c, device=device), query_pos[k]
        visible[k, :c], visible[k, C + S - length:] = s.cached_visible, True
        if s.block_length is not None:
            block[k] = s.block_length
    mask = (visible[:, None, :] & ((key_pos // block)[:, None, :] <= (query_pos // block)[:, :, None]))[:, None]
    kv = KVCache(len(spans[0].cache.keys))
    for layer in range(len(kv.keys)):
        for store, cached in ((kv.keys, [s.cache.keys[layer] for s in spans]),
                              (kv.values, [s.cache.values[layer] for s in spans])):
            buffer = cached[0].new_zeros(n, cached[0].shape[0], C + S, cached[0].shape[2])
            for k, t in enumerate(cached):
                buffer[k, :, :t.shape[1]] = t
            store[layer] = buffer
    lo = min(S - s.ids.numel() + s.logits.start for s in spans)
    hi = max(S - s.ids.numel() + s.logits.stop for s in spans)
    out = model(ids, attention_mask=mask, position_ids=query_pos, kv_cache=kv, cache_start=C,
                logits_slice=slice(lo, hi)).logits
    result = []
    for k, s in enumerate(spans):
        first = C + S - s.ids.numel()
        cols = slice(S - s.ids.numel() + s.logits.start - lo, S - s.ids.numel() + s.logits.stop - lo)
        result.append((out[k, cols], [t[k, :, first:] for t in kv.keys], [t[k, :, first:] for t in kv.values]))
    return result
