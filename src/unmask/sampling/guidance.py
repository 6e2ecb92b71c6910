"""Unsupervised classifier-free guidance (Nie et al., ICLR 2025, Eq. 7).

The unconditional input is the same canvas with every prompt position replaced by the mask
token; both go through the model as one doubled batch and the logits are mixed as
`uncond + (w + 1) · (cond − uncond)`. w = cfg_scale = 0 is plain conditional sampling. (Hugging
Face's `guidance_scale` g is off at 1: g = w + 1.)
"""

from __future__ import annotations

import torch


def unconditional_canvas(x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The canvas with the prompt (the condition c) replaced by masks (m)."""
    return x.masked_fill(prompt_index, mask_id)


def mix_guidance(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    return uncond + (cfg_scale + 1) * (cond - uncond)


def guided_logits(model, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int, cfg_scale: float,
                  attention_mask: torch.Tensor | None = None, logits_slice: slice | None = None,
                  kv_cache=None, span: slice | None = None) -> torch.Tensor:
    """Logits for canvas x, guided when cfg_scale > 0 (conditional and unconditional rows in one pass).

    With `kv_cache`, only the canvas columns `span` run through the model and the rest are read from
    the cache; the unconditional rows are extra batch rows of the same cache (rows B..2B-1).
    `logits_slice` is in canvas columns either way.
    """
    if cfg_scale > 0:
        cond, uncond = branch_logits(model, x, prompt_index, mask_id, attention_mask, logits_slice, kv_cache, span)
        return mix_guidance(cond, uncond, cfg_scale)
    return forward_logits(model, x, attention_mask, logits_slice, kv_cache, span)


def branch_logits(model, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int,
                  attention_mask: torch.Tensor | None = None, logits_slice: slice | None = None,
                  kv_cache=None, span: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) logits of canvas x from one pass over the doubled batch."""
    x = torch.cat([x, unconditional_canvas(x, prompt_index, mask_id)])
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask])
    return forward_logits(model, x, attention_mask, logits_slice, kv_cache, span).chunk(2)


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
