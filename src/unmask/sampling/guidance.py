"""Classifier-free guidance for masked diffusion LMs: one object, `Guidance`, for every form.

Unsupervised CFG (Nie et al., ICLR 2025, Eq. 7) mixes the logits of the canvas (cond) and of an
unconditional canvas (uncond) as `uncond + (w + 1) · (cond − uncond)`; w = cfg_scale = 0 is plain
conditional sampling (Hugging Face's `guidance_scale` g is off at 1: g = w + 1). The forms
published since differ in two small parts, which `Guidance` holds and which swap without touching
the samplers or the scorer (docs/guidance.md has each source and formula):

- the **schedule**: the weight at a step is w · s(t), t the fraction of the generated positions
  already unmasked in that row: `Constant` (s = 1, the seed's), `Linear` (s = t, weak to strong),
  `Interval` (s = 1 for lo <= t <= hi, else 0);
- the **unconditional canvas**: `WholePrompt` (every prompt token masked, the seed's),
  `PromptSpan` (only a span of the prompt's tokens masked), `LowConfidence` (A-CFG: the prompt
  kept and the lowest-confidence generated tokens re-masked, from this step's conditional pass).

A third, optional part changes *when* positions unmask rather than *what* they become:

- **norm** (Rojas et al., ICLR 2026, arXiv 2507.08965): guidance tilts the token distribution to
  p_w ∝ p_c^(1+w) p_u^(−w), whose mass sums to Z_w ≥ 1 before normalising; samplers that let that
  mass set the unmasking rate unmask too fast while the canvas is mostly masked. Their fix keeps
  the rate of the unguided model and uses the guided distribution only for which token a position
  becomes. In unmask's samplers the rate is the remasking rule's score (which positions are
  committed, and under threshold/factor decoding how many), so a normalised form scores each
  position by the conditional model's own top token, and proposes the token from the guided
  logits. With the fixed transfer schedule the count per step is already guidance-free; what
  changes is which positions the count goes to.

A form is written as a short spec, e.g. "linear", "interval:0.5:1", "span:0:-4", "acfg:0.7",
"linear,span:-8:", "linear,norm" (at most one schedule, one canvas and "norm", comma-separated;
defaults "constant,prompt"). The spec is what the options, the CLI, the server and the lm-eval
adapter carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .vocab_parallel import greedy_tokens, is_vocab_sharded, on_shards, take_rows


class GuidanceError(ValueError):
    """A guidance spec that does not parse; the options turn it into an OptionError('guidance')."""


# ---- schedules: s(t) with t (B,) the fraction of each row's generated positions already unmasked ----

@dataclass(frozen=True)
class Constant:
    """s(t) = 1: the same weight at every step (Nie et al.)."""

    def factor(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def __str__(self) -> str:
        return "constant"


@dataclass(frozen=True)
class Linear:
    """s(t) = t: no guidance on the all-mask canvas, full weight w as the text completes (the
    weak-to-strong ramp Rojas et al. derive for masked diffusion)."""

    def factor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def __str__(self) -> str:
        return "linear"


@dataclass(frozen=True)
class Interval:
    """s(t) = 1 while lo <= t <= hi, else 0 (guidance in an interval, Kynkäänniemi et al. 2024)."""

    lo: float
    hi: float

    def factor(self, t: torch.Tensor) -> torch.Tensor:
        return ((t >= self.lo) & (t <= self.hi)).to(t.dtype)

    def __str__(self) -> str:
        return f"interval:{self.lo:g}:{self.hi:g}"


# ---- unconditional canvases ----

@dataclass(frozen=True)
class WholePrompt:
    """Every prompt token replaced by the mask (the condition c removed), Nie et al."""

    adaptive = False

    def masked(self, prompt_index: torch.Tensor) -> torch.Tensor:
        return prompt_index

    def __str__(self) -> str:
        return "prompt"


@dataclass(frozen=True)
class PromptSpan:
    """Only the prompt tokens [start, stop) masked, counted over each row's own prompt tokens
    (Python slice rules: negative counts from the prompt's end, None is open): guide on the part
    of the prompt that matters (the question, not the instructions; the passage, not the question)."""

    start: int | None = None
    stop: int | None = None
    adaptive = False

    def masked(self, prompt_index: torch.Tensor) -> torch.Tensor:
        rank = prompt_index.long().cumsum(-1) - 1               # 0.. over each row's prompt tokens
        n = prompt_index.long().sum(-1, keepdim=True)
        lo = _bound(self.start, n, 0)
        hi = _bound(self.stop, n, n)
        return prompt_index & (rank >= lo) & (rank < hi)

    def __str__(self) -> str:
        return f"span:{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


def _bound(value: int | None, n: torch.Tensor, default) -> torch.Tensor:
    if value is None:
        return default if isinstance(default, torch.Tensor) else torch.zeros_like(n)
    return (n + value).clamp(min=0) if value < 0 else torch.full_like(n, value)


@dataclass(frozen=True)
class LowConfidence:
    """A-CFG (Li et al., arXiv 2505.20199): the prompt stays; of the generated tokens already
    committed, the ⌈ρ · n⌉ with the lowest confidence under this step's conditional pass (the
    probability of the model's top token at that position) are re-masked."""

    ratio: float
    adaptive = True

    def masked_generated(self, confidence: torch.Tensor, committed: torch.Tensor) -> torch.Tensor:
        """(B, n) bool: which committed positions to re-mask, given their confidences (B, n)."""
        k = torch.ceil(committed.sum(-1).double() * self.ratio).long()           # (B,)
        order = confidence.masked_fill(~committed, float("inf")).argsort(dim=-1, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order).contiguous())
        return committed & (rank < k[:, None])

    def __str__(self) -> str:
        return f"acfg:{self.ratio:g}"


class Guided(NamedTuple):
    """One step's logits under guidance: `logits` propose the tokens and, unless `rate` is given
    (a normalised form: the conditional logits), are also what the remasking rule scores to decide
    which positions unmask."""

    logits: torch.Tensor
    rate: torch.Tensor | None = None

    @property
    def normalized(self) -> bool:
        return self.rate is not None

    def apply(self, fn) -> Guided:
        """`fn` applied to each tensor held (e.g. forbidding token ids in both)."""
        return Guided(fn(self.logits), None if self.rate is None else fn(self.rate))


@dataclass(frozen=True)
class Guidance:
    """A form of classifier-free guidance: a schedule of the weight, an unconditional canvas, and
    whether the unmasking rate is the unguided model's (`normalized`, spec "norm").

    Frozen and hashable (the server batches requests with equal options); `str(g)` is its spec
    and `Guidance.parse(str(g)) == g`.
    """

    schedule: Constant | Linear | Interval = field(default_factory=Constant)
    canvas: WholePrompt | PromptSpan | LowConfidence = field(default_factory=WholePrompt)
    normalized: bool = False

    @classmethod
    def parse(cls, spec: "str | Guidance | None") -> Guidance:
        if spec is None:
            return cls()
        if isinstance(spec, Guidance):
            return spec
        if not isinstance(spec, str):
            raise GuidanceError(f"guidance must be a spec string such as 'linear' or 'span:0:-4' (got {spec!r})")
        schedule = canvas = None
        normalized = False
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, *args = part.split(":")
            if name == "norm":
                if args or normalized:
                    raise GuidanceError(f"guidance {spec!r}: write 'norm' once and without arguments")
                normalized = True
            elif name in SCHEDULES:
                if schedule is not None:
                    raise GuidanceError(f"guidance {spec!r} names two schedules ({schedule}, {part}): keep one")
                schedule = SCHEDULES[name](args, part)
            elif name in CANVASES:
                if canvas is not None:
                    raise GuidanceError(f"guidance {spec!r} names two unconditional canvases ({canvas}, {part}): "
                                        "keep one")
                canvas = CANVASES[name](args, part)
            else:
                raise GuidanceError(f"unknown guidance part {part!r}: schedules are constant, linear, "
                                    "interval:LO:HI; unconditional canvases are prompt, span:START:STOP, acfg:RATIO; "
                                    "'norm' keeps the unguided unmasking rate")
        return cls(schedule or Constant(), canvas or WholePrompt(), normalized)

    def __str__(self) -> str:
        return f"{self.schedule},{self.canvas}" + (",norm" if self.normalized else "")

    def short(self) -> str:
        """The spec without its default parts ("prompt" for the seed's form): a column label that
        still parses back to this form."""
        parts = [str(p) for p, default in ((self.schedule, Constant()), (self.canvas, WholePrompt())) if p != default]
        parts += ["norm"] if self.normalized else []
        return ",".join(parts) or str(self.canvas)

    @property
    def scheduled(self) -> bool:
        """Whether the weight depends on t (any schedule but the constant one): only then is t needed."""
        return not isinstance(self.schedule, Constant)

    def weights(self, w: float, t: torch.Tensor) -> torch.Tensor:
        """(B,) per-row weights w · s(t)."""
        return w * self.schedule.factor(t)

    def idle(self, w: float, t: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) bool: the rows whose weight is 0 at this step (outside an interval, or t = 0 under the
        linear ramp); None when no row can be (the constant schedule). An idle row is not guided: its
        logits are the conditional ones, so a pass need not run its unconditional row."""
        if not self.scheduled or t is None:
            return None
        return self.weights(w, t) == 0

    def all_idle(self, w: float, t: torch.Tensor | None) -> bool:
        """Whether every row is idle at this step (`idle`): then no unconditional row need run."""
        idle = self.idle(w, t)
        return idle is not None and bool(idle.all())

    def mix(self, cond: torch.Tensor, uncond: torch.Tensor, w: float, t: torch.Tensor | None) -> torch.Tensor:
        """The guided logits; the constant schedule is exactly `mix_guidance` (the seed's arithmetic).
        An idle row (`idle`) gets `cond` itself, not uncond + 1 · (cond − uncond), which rounds."""
        if not self.scheduled or t is None:
            return mix_guidance(cond, uncond, w)
        if is_vocab_sharded(cond):   # elementwise: each rank mixes its own columns
            return on_shards(lambda c, u: self.mix(c, u, w, t), cond, uncond)
        weights = self.weights(w, t)
        idle = weights == 0
        n_idle = int(idle.sum())   # one host sync; the rows are few
        if n_idle == len(idle):
            return cond
        shape = (-1, *([1] * (cond.dim() - 1)))
        gain = (weights.double() + 1).to(cond.dtype)   # w_t + 1 rounded once, as a Python float would be
        mixed = amplified(cond, uncond, gain.view(shape))
        if n_idle:   # overwrite the idle rows in place: a torch.where over the whole step cost as much as the mix
            mixed[idle] = cond[idle]
        return mixed

    def step(self, cond: torch.Tensor, uncond: torch.Tensor | None, w: float, t: torch.Tensor | None) -> Guided:
        """A sampling step's `Guided` logits: the mix, and the conditional logits as the rate when
        normalised. `uncond` None: every row is idle (its unconditional pass was skipped)."""
        mixed = cond if uncond is None else self.mix(cond, uncond, w, t)
        return Guided(mixed, cond if self.normalized else None)

    def unconditional(self, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int) -> torch.Tensor:
        """The static unconditional canvas (WholePrompt, PromptSpan)."""
        return x.masked_fill(self.canvas.masked(prompt_index), mask_id)


def _no_args(cls):
    def make(args, part):
        if args:
            raise GuidanceError(f"guidance part {part!r} takes no arguments: write {cls().__str__()!r}")
        return cls()
    return make


def _interval(args, part) -> Interval:
    lo, hi = _floats(args, 2, part, "interval:LO:HI with 0 <= LO <= HI <= 1, e.g. interval:0.5:1")
    if not 0 <= lo <= hi <= 1:
        raise GuidanceError(f"guidance part {part!r}: need 0 <= LO <= HI <= 1 (fractions of the text unmasked)")
    return Interval(lo, hi)


def _span(args, part) -> PromptSpan:
    if len(args) != 2:
        raise GuidanceError(f"guidance part {part!r}: write span:START:STOP (prompt token positions, negative "
                            "from the end, empty for open), e.g. span:0:-4 or span:-8:")
    try:
        start, stop = (int(a) if a.strip() else None for a in args)
    except ValueError:
        raise GuidanceError(f"guidance part {part!r}: START and STOP must be integers or empty") from None
    return PromptSpan(start, stop)


def _acfg(args, part) -> LowConfidence:
    (ratio,) = _floats(args, 1, part, "acfg:RATIO with 0 < RATIO <= 1, e.g. acfg:0.7")
    if not 0 < ratio <= 1:
        raise GuidanceError(f"guidance part {part!r}: the re-mask ratio must be in (0, 1]")
    return LowConfidence(ratio)


def _floats(args, n: int, part: str, usage: str) -> list[float]:
    try:
        values = [float(a) for a in args]
    except ValueError:
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise GuidanceError(f"guidance part {part!r}: write {usage}")
    return values


SCHEDULES = {"constant": _no_args(Constant), "linear": _no_args(Linear), "interval": _interval}
CANVASES = {"prompt": _no_args(WholePrompt), "span": _span, "acfg": _acfg}
DEFAULT = Guidance()


def unmasked_fraction(x: torch.Tensor, generated: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B,) t: the fraction of each row's generated positions (`generated` (B, T) bool) that hold a token."""
    total = generated.sum(-1).clamp(min=1)
    return ((x != mask_id) & generated).sum(-1).double() / total


def unconditional_canvas(x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The canvas with the prompt (the condition c) replaced by masks (m)."""
    return x.masked_fill(prompt_index, mask_id)


def mix_guidance(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The seed's `uncond + (cfg_scale + 1) * (cond - uncond)`."""
    return amplified(cond, uncond, cfg_scale + 1)


def amplified(cond: torch.Tensor, uncond: torch.Tensor, gain: float | torch.Tensor) -> torch.Tensor:
    """uncond + gain · (cond − uncond), computed in place on one temporary instead of three: the
    same two IEEE operations, commuted (exact), so the same bits as the expression, at about half its
    time on a (B, W, V) step (the mix is a few per cent of a reuse_uncond step on a CPU)."""
    return (cond - uncond).mul_(gain).add_(uncond)


def guided_logits(model, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int, cfg_scale: float,
                  attention_mask: torch.Tensor | None = None, logits_slice: slice | None = None,
                  kv_cache=None, span: slice | None = None, guidance: Guidance = DEFAULT,
                  t: torch.Tensor | None = None) -> Guided:
    """`Guided` logits for canvas x, guided when cfg_scale > 0 (conditional and unconditional rows in one pass).

    With `kv_cache`, only the canvas columns `span` run through the model and the rest are read from
    the cache; the unconditional rows are extra batch rows of the same cache (rows B..2B-1).
    `logits_slice` is in canvas columns either way. `guidance` is the form, `t` (B,) each row's
    fraction unmasked (for its schedule). An adaptive canvas (A-CFG) runs the conditional pass
    first and the unconditional one after it (it needs the conditional confidences), without a cache.
    Without a cache, when the schedule gives every row weight 0 at this step, only the conditional
    rows run (`cached_logits` makes the same skip for a cache it knows is filled).
    """
    if cfg_scale <= 0:
        return Guided(forward_logits(model, x, attention_mask, logits_slice, kv_cache, span))
    if kv_cache is None and guidance.all_idle(cfg_scale, t):   # no row is guided: the conditional pass alone
        return guidance.step(forward_logits(model, x, attention_mask, logits_slice), None, cfg_scale, t)
    if guidance.canvas.adaptive:
        cond, uncond = low_confidence_branches(model, x, prompt_index, mask_id, guidance.canvas, attention_mask,
                                               logits_slice)
    else:
        cond, uncond = branch_logits(model, x, prompt_index, mask_id, attention_mask, logits_slice, kv_cache, span,
                                     guidance)
    return guidance.step(cond, uncond, cfg_scale, t)


def branch_logits(model, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int,
                  attention_mask: torch.Tensor | None = None, logits_slice: slice | None = None,
                  kv_cache=None, span: slice | None = None,
                  guidance: Guidance = DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) logits of canvas x from one pass over the doubled batch.

    When every unconditional row is the same canvas and the pass starts from nothing (no cache, or
    an empty one that it allocates), that canvas runs once and its logits and keys/values are copied
    to every row. That is the first step of every batch of prompts of one length: masked whole, each
    is nothing but masks. A batch-8 refresh of the bundled model then runs 9 rows instead of 16.
    """
    n = x.shape[0]
    uncond = guidance.unconditional(x, prompt_index, mask_id)
    shared = n > 1 and (kv_cache is None or kv_cache.empty) and same_rows(uncond, attention_mask)
    twins = slice(0, 1) if shared else slice(None)   # the unconditional rows that run
    x = torch.cat([x, uncond[twins]])
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask[twins]])
    logits = forward_logits(model, x, attention_mask, logits_slice, kv_cache, span)
    if shared:
        rows = torch.cat([torch.arange(n, device=x.device), torch.full((n,), n, device=x.device)])
        logits = take_rows(logits, rows)
        if kv_cache is not None:
            kv_cache.select_rows(rows)
    return logits.chunk(2)


def same_rows(x: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether every row of x (B, T) is the first one, attention mask included."""
    same = bool((x == x[:1]).all())
    return same and (attention_mask is None or bool((attention_mask == attention_mask[:1]).all()))


def low_confidence_branches(model, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int,
                            canvas: LowConfidence, attention_mask: torch.Tensor | None = None,
                            logits_slice: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A-CFG's (conditional, unconditional) logits over `logits_slice`: the conditional pass also
    scores the committed generated tokens before the slice, whose confidences pick what to re-mask."""
    T = x.shape[1]
    logits_slice = logits_slice or slice(0, T)
    valid = torch.ones_like(x, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    generated = valid & ~prompt_index
    first = generated.any(0).nonzero()
    start = min(int(first[0]) if len(first) else T, logits_slice.start)
    cols = slice(start, logits_slice.stop)
    cond = forward_logits(model, x, attention_mask, cols)
    confidence = top_probability(cond)
    committed = generated[:, cols] & (x[:, cols] != mask_id)
    remask = torch.zeros_like(x, dtype=torch.bool)
    remask[:, cols] = canvas.masked_generated(confidence, committed)
    uncond = forward_logits(model, x.masked_fill(remask, mask_id), attention_mask, logits_slice)
    return cond[:, logits_slice.start - start:], uncond


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) the probability of each position's likeliest token (in float32), sharded logits too."""
    if is_vocab_sharded(logits):
        return greedy_tokens(logits.float())[1]
    return logits.float().softmax(-1).max(-1).values


def is_native(model) -> bool:
    """Whether `model` is unmask's own transformer (possibly torch.compile'd), which takes kv_cache."""
    from ..models import MaskedDiffusionLM

    return isinstance(getattr(model, "_orig_mod", model), MaskedDiffusionLM)


def forward_logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None,
                   logits_slice: slice | None = None, kv_cache=None, span: slice | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`model(x).logits[:, logits_slice]`, asking native models to compute only that slice.

    With `kv_cache` (native models only) the model runs on `x[:, span]` against the cache; the
    attention mask still covers the whole canvas, so positions count real tokens as without a cache.
    A torch.compile'd model computes the logits of every column it runs and they are sliced here:
    a slice that moves from step to step would recompile the graph.
    """
    extra = {} if position_ids is None else {"position_ids": position_ids}   # used without a span only
    if not is_native(model):
        kwargs = extra if attention_mask is None else {"attention_mask": attention_mask, **extra}
        logits = model(x, **kwargs).logits
        return logits if logits_slice is None else logits[:, logits_slice]
    start = 0 if span is None else span.start
    local = None if logits_slice is None else slice(logits_slice.start - start, logits_slice.stop - start)
    if span is not None:
        x = x[:, span]
    if hasattr(model, "_orig_mod"):
        logits = model(x, attention_mask=attention_mask, kv_cache=kv_cache, cache_start=start, **extra).logits
        return logits if local is None else logits[:, local]
    return model(x, attention_mask=attention_mask, kv_cache=kv_cache, cache_start=start, logits_slice=local,
                 **extra).logits
