"""The sampler's options, defined and checked in one place for every entry point.

`generate` takes them as keyword arguments under the reference's names. The CLI, the server, the
lm-eval adapter and the bench build a `SamplerOptions` from their own inputs and call `check()`
before any model is loaded, so a bad value gets the same message everywhere, and an entry point
only translates `OptionError.option` into its own spelling (a flag, a request field). What needs
the model (its vocabulary, its context, whether it is unmask's own) is `check_for_model`.

Nothing is replaced silently: a value the sampler cannot honour is an error that says what to
change, never a quiet fallback to a default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from .guidance import Guidance, GuidanceError, is_native
from .remasking import REMASKING_RULES
from .schedule import transfer_schedule

CACHE_MODES = ("prefix", "dual")
PROBABILITY_RULES = ("low_confidence", "margin", "random")   # rules whose scores lie in [0, 1]
SEED_RANGE = (-2**63, 2**64 - 1)                             # what torch.Generator.manual_seed takes
CFG_SCALE_MAX = 100.0   # far above any useful weight (LLaDA uses up to ~3); huge ones overflow the guided logits


class OptionError(ValueError):
    """A sampler option the sampler cannot honour; `option` is its name in `SamplerOptions`."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


class GuidedOptions:
    """What both option sets share about guidance: the `guidance` spec is stored in its canonical
    spelling (so equal forms batch together; an unparsable one is kept as given for `check` to
    report), and `form` is the `Guidance` it names."""

    def __post_init__(self):
        try:
            object.__setattr__(self, "guidance", str(Guidance.parse(self.guidance)))
        except GuidanceError:
            pass

    @property
    def form(self) -> Guidance:
        """The guidance form (schedule, unconditional canvas) named by `guidance`."""
        return Guidance.parse(self.guidance)

    @property
    def canvas_rows(self) -> int:
        """How many canvas rows a request runs in a forward pass: two when guided (its unconditional
        twin), else one. What batching budgets and pass splitting count."""
        return 2 if self.cfg_scale > 0 else 1


@dataclass(frozen=True)
class SamplerOptions(GuidedOptions):
    """Every setting of `generate` that a user chooses (defaults are the reference's).

    Frozen and hashable: the server batches requests whose options are equal.
    """

    steps: int = 128
    gen_length: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    cache: str | None = None
    cache_refresh: str | int = "block"
    threshold: float | None = None
    factor: float | None = None
    reuse_uncond: bool = False
    cuda_graph: bool = False
    compile: bool | str = False
    guidance: str = str(Guidance())

    @property
    def parallel(self) -> bool:
        """Threshold/factor decoding: a block takes as many steps as it needs, `steps` is unused."""
        return self.threshold is not None or self.factor is not None

    @property
    def stochastic(self) -> bool:
        """Whether the output depends on random draws (so on a generator's seed)."""
        return self.temperature > 0 or self.remasking == "random"

    @property
    def steps_per_block(self) -> int | None:
        return None if self.parallel else self.steps // (self.gen_length // self.block_length)

    def kwargs(self) -> dict:
        """The options as `generate` keyword arguments."""
        return asdict(self)

    def check(self, device: str | torch.device | None = None) -> SamplerOptions:
        """Raise OptionError for the first option that cannot be honoured; returns self.

        `device`, when given, is where the model will run: `cuda_graph` is refused off CUDA there
        (the library itself runs the graph path without capture on a CPU, which is what tests use).
        """
        self._check_lengths()
        _number(self.temperature, "temperature", minimum=0.0)
        check_cfg_scale(self.cfg_scale)
        form = check_guidance(self.guidance)
        if form.canvas.adaptive and self.cache is not None and self.cfg_scale > 0:
            raise OptionError("guidance", f"guidance {self.guidance!r} re-masks generated tokens anywhere in the text "
                                          "at every step, which a cache filled at the last refresh cannot see: use "
                                          "cache=None with acfg")
        if self.remasking not in REMASKING_RULES:
            raise OptionError("remasking", f"unknown remasking {self.remasking!r}: choose one of "
                                           f"{', '.join(REMASKING_RULES)}")
        self._check_fast_options()
        if self.cuda_graph and device is not None and torch.device(device).type != "cuda":
            raise OptionError("cuda_graph", f"cuda_graph captures CUDA graphs and the model runs on {device}: "
                                            "drop it, or run on a CUDA device")
        return self

    def _check_lengths(self) -> None:
        _integer(self.gen_length, "gen_length")
        _integer(self.block_length, "block_length")
        _integer(self.steps, "steps")
        if self.gen_length % self.block_length:
            raise OptionError("block_length", f"gen_length ({self.gen_length}) must be a multiple of block_length "
                                              f"({self.block_length}); e.g. block_length="
                                              f"{_largest_divisor_at_most(self.gen_length, self.block_length)}")
        if self.parallel:
            return
        blocks = self.gen_length // self.block_length
        if self.steps % blocks:
            raise OptionError("steps", f"steps ({self.steps}) must be a multiple of the number of blocks "
                                       f"(gen_length / block_length = {blocks}); e.g. steps="
                                       f"{max(blocks, self.steps // blocks * blocks)}")
        if self.steps // blocks > self.block_length:
            raise OptionError("steps", f"{self.steps // blocks} steps per block but only {self.block_length} tokens "
                                       f"per block: the extra steps would commit nothing; use steps <= "
                                       f"{self.gen_length}")

    def _check_fast_options(self) -> None:
        if self.cache is not None and self.cache not in CACHE_MODES:
            raise OptionError("cache", f"unknown cache {self.cache!r}: choose None, 'prefix' or 'dual'")
        refresh = self.cache_refresh
        if not (refresh == "block" or (type(refresh) is int and refresh >= 1)):
            raise OptionError("cache_refresh", f"cache_refresh must be 'block' or a number of steps >= 1 "
                                               f"(got {refresh!r})")
        if self.threshold is not None and self.factor is not None:
            raise OptionError("factor", "pass threshold or factor, not both")
        if self.threshold is not None:
            if self.remasking in PROBABILITY_RULES:
                _number(self.threshold, "threshold", minimum=0.0, maximum=1.0,
                        hint=f"; {self.remasking!r} scores are probabilities")
            else:
                _number(self.threshold, "threshold", maximum=0.0, hint="; 'entropy' scores are minus an entropy")
        if self.factor is not None:
            _number(self.factor, "factor", minimum=0.0, strict_minimum=True, hint="; Fast-dLLM uses about 1")
        if self.reuse_uncond and self.cache is None:
            raise OptionError("reuse_uncond", "reuse_uncond keeps the unconditional logits of a cache refresh for "
                                              "the steps after it: it needs cache='prefix' or 'dual'")
        if self.cuda_graph and self.cache != "dual":
            raise OptionError("cuda_graph", "cuda_graph captures the dual cache's block step (a fixed shape): use "
                                            "it with cache='dual'")
        if not isinstance(self.compile, (bool, str)):
            raise OptionError("compile", f"compile must be True/False or a torch.compile backend name "
                                         f"(got {self.compile!r})")

    def check_for_model(self, model, prompt_length: int, mask_id: int, prompt_masked: bool = False) -> None:
        """What only the model can tell: its vocabulary, its context, and what its runner supports."""
        check_mask_id(model, mask_id)
        limit = context_length(model)
        if limit is not None and prompt_length + self.gen_length > limit:
            raise OptionError("prompt", f"prompt ({prompt_length} tokens) + gen_length ({self.gen_length}) = "
                                        f"{prompt_length + self.gen_length} exceeds the model's context of {limit} "
                                        "tokens; shorten the prompt or lower gen_length")
        if self.cache is not None and not is_native(model):
            raise OptionError("cache", "cache= needs unmask's own model (models loaded with trust_remote_code run "
                                       "without a KV cache); use cache=None")
        if self.cache is not None and prompt_masked:
            raise OptionError("cache", "cache= treats the prompt as fixed: positions before the current block are "
                                       "served from the cache and never recomputed, so masks in the prompt "
                                       "(infilling) cannot be filled; use cache=None for infilling")


@dataclass(frozen=True)
class BlockOptions(GuidedOptions):
    """The settings of block-diffusion decoding (LLaDA2.x), under the public `generate`'s names and
    meanings: `steps` is per block, `threshold` commits every position scoring above it when at
    least the schedule's count do (None: the schedule alone), `minimal_topk` caps the steps at
    gen_length // minimal_topk. Guidance is unmask's (`cfg_scale`, `reuse_uncond`)."""

    gen_length: int = 2048
    block_length: int = 32
    steps: int = 32
    threshold: float | None = 0.95
    minimal_topk: int = 1
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 0.0
    reuse_uncond: bool = False
    guidance: str = str(Guidance())

    def kwargs(self) -> dict:
        """The options as `block_generate` keyword arguments."""
        return asdict(self)

    @property
    def stochastic(self) -> bool:
        """Whether the output depends on random draws: only when sampling (temperature > 0)."""
        return self.temperature > 0

    @property
    def block_steps(self) -> int:
        """Steps per block, as the public code caps them."""
        return min(self.steps, self.gen_length // self.minimal_topk)

    @property
    def schedule(self) -> list[int]:
        """Commits per step of a block: the block length split over `block_steps` (the first
        block_length % steps steps one more), as the public code splits it."""
        return transfer_schedule(torch.tensor([self.block_length]), self.block_steps)[0].tolist()

    def check(self, device: str | torch.device | None = None) -> BlockOptions:
        """Raise OptionError for the first option that cannot be honoured; returns self. `device`
        is taken for symmetry with `SamplerOptions.check`: block decoding runs anywhere."""
        for name in ("gen_length", "block_length", "steps", "minimal_topk"):
            _integer(getattr(self, name), name)
        if self.minimal_topk > self.gen_length:
            raise OptionError("minimal_topk", f"minimal_topk ({self.minimal_topk}) leaves no step for gen_length "
                                              f"{self.gen_length}: use minimal_topk <= gen_length")
        if self.threshold is not None:
            _number(self.threshold, "threshold", minimum=0.0, maximum=1.0, hint="; scores are probabilities")
        _number(self.temperature, "temperature", minimum=0.0)
        if self.top_k is not None:
            _integer(self.top_k, "top_k")
        if self.top_p is not None:
            _number(self.top_p, "top_p", minimum=0.0, maximum=1.0, strict_minimum=True)
        check_cfg_scale(self.cfg_scale)
        if check_guidance(self.guidance).canvas.adaptive and self.cfg_scale > 0:
            raise OptionError("guidance", "acfg (A-CFG) runs in the LLaDA sampler only: block-diffusion decoding keeps "
                                          "finished blocks in an exact cache that re-masking would invalidate; use "
                                          "the prompt or a span as the unconditional canvas")
        return self

    def check_for_model(self, model, prompt_length: int, mask_id: int) -> None:
        check_mask_id(model, mask_id)
        canvas = -(-(prompt_length + self.gen_length) // self.block_length) * self.block_length
        limit = context_length(model)
        if limit is not None and canvas > limit:
            raise OptionError("prompt", f"prompt ({prompt_length} tokens) + gen_length ({self.gen_length}), rounded up "
                                        f"to whole blocks of {self.block_length}, is {canvas} tokens: more than the "
                                        f"model's context of {limit}; shorten the prompt or lower gen_length")


def options_for(block_diffusion: bool, device: str | torch.device | None = None,
                **given) -> SamplerOptions | BlockOptions:
    """The checked options of a model family from the values an entry point was given (None: not
    given, so the family's default). A value only the other family takes is an error naming it:
    e.g. `remasking` or `cache` for a LLaDA2.x model, `top_p` for a LLaDA model."""
    cls = BlockOptions if block_diffusion else SamplerOptions
    names = {f.name for f in fields(cls)}
    family = "block-diffusion (LLaDA2.x)" if block_diffusion else "LLaDA (non-block-diffusion)"
    for name, value in given.items():
        if value is not None and name not in names:
            raise OptionError(name, f"{name} does not apply to {family} models: drop it")
    return cls(**{k: v for k, v in given.items() if v is not None}).check(device=device)


def check_mask_id(model, mask_id: int) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and not 0 <= mask_id < vocab:
        raise OptionError("mask_id", f"mask_id {mask_id} is outside the model's vocabulary (0..{vocab - 1})")


def check_cfg_scale(w: float) -> float:
    """A guidance weight: >= 0 (0 is no guidance) and at most CFG_SCALE_MAX, beyond which the
    guided logits uncond + (w+1)(cond - uncond) overflow to inf/NaN and the text comes out empty.
    Also what the likelihood paths take."""
    _number(w, "cfg_scale", minimum=0.0, maximum=CFG_SCALE_MAX, hint="; 0 turns guidance off")
    return w


def check_guidance(spec) -> Guidance:
    """The guidance form a spec names (see `unmask.sampling.guidance`), or OptionError('guidance')."""
    try:
        return Guidance.parse(spec)
    except GuidanceError as e:
        raise OptionError("guidance", str(e)) from None


def check_scoring_guidance(spec) -> Guidance:
    """A guidance form for likelihood scoring: A-CFG needs a text being generated, and 'norm' changes
    when positions unmask, which scoring never does."""
    form = check_guidance(spec)
    if form.canvas.adaptive:
        raise OptionError("guidance", "acfg re-masks tokens of a text being generated; likelihood scoring has none: "
                                      "use the prompt or a span as the unconditional canvas")
    if form.normalized:
        raise OptionError("guidance", "'norm' changes which positions unmask while sampling; likelihood scoring "
                                      "unmasks nothing: drop 'norm' from the form")
    return form


def check_seed(seed: int | None) -> int | None:
    """A seed torch.Generator accepts, or None."""
    low, high = SEED_RANGE
    if seed is not None and (type(seed) is not int or not low <= seed <= high):
        raise OptionError("seed", f"seed must be an integer in [-2**63, 2**64 - 1] (got {seed!r})")
    return seed


def context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_seq_len", "max_sequence_length", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return None


def _integer(value, name: str) -> None:
    if type(value) is not int or value < 1:
        raise OptionError(name, f"{name} must be a positive integer (got {value!r})")


def _number(value, name: str, minimum: float | None = None, maximum: float | None = None,
            strict_minimum: bool = False, hint: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or (value > minimum if strict_minimum else value >= minimum))
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        low = "" if minimum is None else f"{'>' if strict_minimum else '>='} {minimum:g}"
        high = "" if maximum is None else f"<= {maximum:g}"
        bound = " and ".join(b for b in (low, high) if b)
        raise OptionError(name, f"{name} must be a finite number {bound} (got {value!r}){hint}")


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)
