"""Per-row block diffusion (LLaDA2.x) for continuous batching: the block-diffusion counterpart of
`rows.py`. Every `BlockRow` carries its own canvas, block grid, place in the block's schedule,
settings, random generator and exact cache; `block_step(model, rows)` advances each by one step
of its own, and rows may join and leave between steps.

The guarantee is `block_generate`'s: a row's text equals that request run alone through
`block_generate` (same options, same seed, the cache on). What makes it hold:
- a row makes the decisions `block_generate` makes for a batch of one: the same block grid
  (blocks at absolute positions, the one holding the prompt's end first), schedule, proposals
  (`sample_tokens` with the row's own generator), commit rule (`threshold_commit`), EOS rules and
  cache spans: a block's first step runs [cache end, block end) (the blocks finished since the
  last pass, now final, and the current block), later steps the current block alone;
- each row keeps its own cache (a `rows.RowCache`: keys/values of its final columns, per layer, for the
  conditional branch and, when guided, the unconditional one). A shared pass stacks them: row k's
  cached columns at the start of a scratch cache, its span right-aligned at the end, so every
  row's current block is the pass's last columns; a per-row mask gives each query exactly the keys
  it has alone (block-causal over the row's own positions, padding never attended), and positions
  are the row's own, so the logits are those of the row alone (up to the rounding of a wider
  matrix product, which greedy decoding never saw flip a token in the tests);
- guided rows add their unconditional spans as further rows of the pass (`reuse_uncond`: only at
  a block's first step; none at a step where the row's schedule gives it weight 0), mixed per row
  under the row's guidance form.

Spans of very different lengths (a row's first step after a long prompt, another's block alone)
are split into passes as `rows.pass_groups` says. `block_steppable` says which options and models
this runs: unmask's own models (the cache needs them), every `BlockOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blocks import decoded_text_end, sample_tokens, threshold_commit
from .guidance import Guided, is_native, unmasked_fraction
from .options import BlockOptions
from .rows import CachedSpan, RowCache, StepResult, cached_passes, empty_cache


def block_steppable(model, options) -> bool:
    """Whether rows with these options can be advanced by `block_step` on `model`: block-diffusion
    options on unmask's own model (a checkpoint's remote code takes no cache)."""
    return isinstance(options, BlockOptions) and is_native(model)


@dataclass(eq=False)
class BlockRow:
    """One request's block-diffusion state. Build it with `BlockRow.start`; `block_step` advances it."""

    options: BlockOptions
    x: torch.Tensor                  # (W,) left-aligned canvas: prompt, then masks to whole blocks
    prompt_length: int
    mask_id: int
    generator: torch.Generator | None
    eos_id: int | None
    eos_early_stop: bool
    schedule: list[int]              # commits per step of a block (the public code's split of b)
    histories: tuple[RowCache, RowCache]   # conditional, unconditional: the final columns
    block: int = 0                   # current block index (absolute, on the row's own grid)
    block_step: int = 0              # steps taken in the current block
    step_index: int = 0              # steps taken in all
    end: int = -1                    # where the text ends (exclusive) once known
    kept_uncond: torch.Tensor | None = None   # reuse_uncond: the block's first-step unconditional logits
    done: bool = False
    last: StepResult | None = field(default=None, repr=False)

    @classmethod
    def start(cls, prompt: list[int] | torch.Tensor, options: BlockOptions, *, model, mask_id: int,
              generator: torch.Generator | None = None, eos_id: int | None = None, eos_early_stop: bool = False,
              device: torch.device | str = "cpu") -> BlockRow:
        """A row at its first step. `options` must be checked (also against the model and prompt);
        the keywords are `block_generate`'s."""
        if not block_steppable(model, options):
            raise ValueError("block rows need block-diffusion options and unmask's own model (its exact cache)")
        if eos_early_stop and eos_id is None:
            raise ValueError("eos_early_stop needs an EOS id")
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=device).flatten()
        P, b = prompt.numel(), options.block_length
        total = -(-(P + options.gen_length) // b) * b
        x = torch.full((total,), mask_id, dtype=torch.long, device=device)
        x[:P] = prompt
        histories = (empty_cache(model, device), empty_cache(model, device))
        row = cls(options, x, P, mask_id, generator, eos_id, eos_early_stop, options.schedule, histories,
                  block=P // b)
        row._settle()
        return row

    @property
    def gen(self) -> torch.Tensor:
        """(gen_length,) the generated part, EOS after the text's end (as `block_generate` returns it)."""
        P, G = self.prompt_length, self.options.gen_length
        gen = self.x[P:P + G]
        if self.end < 0:
            return gen
        after = torch.arange(P, P + G, device=gen.device) >= self.end
        return gen.masked_fill(after, self.eos_id if self.eos_id is not None else self.mask_id)

    @property
    def first_block(self) -> int:
        """The block holding the prompt's end: the first one decoded."""
        return self.prompt_length // self.options.block_length

    @property
    def blocks(self) -> int:
        """How many blocks the row decodes (for the live view)."""
        return self.last_block - self.first_block + 1

    @property
    def block_number(self) -> int:
        """Which of them it is in, from 0."""
        return self.block - self.first_block

    @property
    def total_steps(self) -> None:
        """Unknown ahead: a block ends as soon as its threshold has committed everything."""
        return None

    @property
    def last_block(self) -> int:
        return (self.prompt_length + self.options.gen_length - 1) // self.options.block_length

    @property
    def window(self) -> slice:
        """The current block's columns."""
        b = self.options.block_length
        return slice(self.block * b, (self.block + 1) * b)

    @property
    def guided(self) -> bool:
        return self.options.cfg_scale > 0

    def span(self, branch: int) -> slice:
        """The columns this step runs in a branch: from the cache's end, which is the current block's
        start once the branch has run in this block (at a block's first step the blocks finished
        since its last pass come first)."""
        return slice(self.histories[branch].columns, self.window.stop)

    def canvas(self, branch: int) -> torch.Tensor:
        """(W,) the conditional canvas, or the unconditional one (the guidance form's canvas: the
        prompt, or a span of it, masked)."""
        if branch == 0:
            return self.x
        prompt = torch.arange(self.x.numel(), device=self.x.device) < self.prompt_length
        return self.options.form.unconditional(self.x[None], prompt[None], self.mask_id)[0]

    def cached_span(self, branch: int) -> CachedSpan:
        """This step's part of a cached pass in a branch: its span against its cache, block-causal,
        logits over the current block."""
        s, history = self.span(branch), self.histories[branch]
        return CachedSpan(self.canvas(branch)[s], torch.arange(s.start, s.stop, device=self.x.device), history,
                          torch.ones(history.columns, dtype=torch.bool, device=self.x.device),
                          self.options.block_length, slice(self.window.start - s.start, s.stop - s.start))

    def keep_finished(self, branch: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """After a pass, its span's columns before the current block (final now) join the cache."""
        s, w = self.span(branch), self.window
        if s.start < w.start:
            history, n = self.histories[branch], w.start - s.start
            history.keys = [torch.cat([old, new[:, :n]], 1) for old, new in zip(history.keys, keys)]
            history.values = [torch.cat([old, new[:, :n]], 1) for old, new in zip(history.values, values)]

    def runs(self, branch: int) -> bool:
        """Whether this step runs the branch: the unconditional one only when guided, with
        reuse_uncond only at a block's first step, without it not where the schedule gives the row
        weight 0 (`block_generate`'s rule for a batch of one)."""
        if branch == 0:
            return True
        if not self.guided:
            return False
        o = self.options
        if o.reuse_uncond:
            return self.block_step == 0
        return not o.form.all_idle(o.cfg_scale, self._unmasked_fraction())

    def _settle(self) -> None:
        """Leave finished blocks as `block_generate` does: a block ends after its schedule or once it
        has no mask; then an EOS in the text ends the row, as does the last block."""
        while not self.done:
            w = self.window
            if self.block_step < len(self.schedule) and bool((self.x[w] == self.mask_id).any()):
                return
            if self.eos_id is not None:
                eos = (self.x[self.prompt_length:w.stop] == self.eos_id).nonzero()
                if len(eos):
                    self.end = self.prompt_length + int(eos[0]) + 1
            if self.end < 0 and self.block == self.last_block:
                self.end = self.prompt_length + self.options.gen_length
            if self.end >= 0:
                self.done = True
                return
            self.block += 1
            self.block_step = 0

    def _unmasked_fraction(self) -> torch.Tensor | None:
        """(1,) the fraction of the text unmasked, the guidance schedule's clock; None under the
        constant schedule, which reads no clock."""
        if not self.options.form.scheduled:
            return None
        P, G = self.prompt_length, self.options.gen_length
        cols = torch.arange(self.x.numel(), device=self.x.device)
        return unmasked_fraction(self.x[None], ((cols >= P) & (cols < P + G))[None], self.mask_id)

    def _decide(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> None:
        """Commit this step's tokens from the block's logits (b, V) of each branch (uncond None where
        the unconditional one did not run)."""
        o, w = self.options, self.window
        if not self.guided:
            guided = Guided(cond[None])
        else:   # uncond None: idle at this step (the form gives the conditional logits)
            guided = o.form.step(cond[None], None if uncond is None else uncond[None], o.cfg_scale,
                                 self._unmasked_fraction())
        tokens, confidence = sample_tokens(guided.logits, o.temperature, o.top_k, o.top_p, self.generator)
        if guided.normalized:   # the unguided rate: the conditional model's confidence in its own top token
            confidence = sample_tokens(guided.rate, 0.0, None, None, None)[1]
        candidates = (self.x[w] == self.mask_id)[None]
        confidence = confidence.masked_fill(~candidates, float("-inf"))
        chosen = threshold_commit(confidence, self.schedule[self.block_step], o.threshold)
        self.x[w] = torch.where(chosen[0], tokens[0], self.x[w])
        P, G = self.prompt_length, o.gen_length
        if self.eos_early_stop and bool((chosen & (tokens == self.eos_id)).any()):
            length = decoded_text_end(self.x[P:w.stop], self.eos_id, self.mask_id)
            if length is not None:
                self.end, self.done = P + length, True
        self.last = StepResult.of(self.step_index, self.block, self.x, w, chosen, confidence, slice(P, P + G))
        self.block_step += 1
        self.step_index += 1
        self._settle()


@torch.no_grad()
def block_step(model, rows: list[BlockRow], pad_id: int = 0, pass_overhead: float | None = None) -> None:
    """Advance every row that is not done by one block-diffusion step of its own: one forward pass
    over every row's spans (conditional, and unconditional where guided), or a few passes when
    their lengths differ so much that padding costs more than a pass (`pass_overhead`, as `rows.step`)."""
    live = [r for r in rows if not r.done]
    if not live:
        return
    runs = [(r, branch) for r in live for branch in (0, 1) if r.runs(branch)]
    by_row = {}
    for (r, branch), (logits, keys, values) in zip(runs, cached_passes(model, [r.cached_span(b) for r, b in runs],
                                                                       pad_id, pass_overhead)):
        by_row[id(r), branch] = logits
        r.keep_finished(branch, keys, values)
    for r in live:
        uncond = by_row.get((id(r), 1))   # None: unguided, idle at this step, or reusing
        if r.guided and r.options.reuse_uncond:
            if uncond is None:   # a later step of the block: the first step's logits
                uncond = r.kept_uncond
            else:
                r.kept_uncond = uncond
        r._decide(by_row[id(r), 0], uncond)
