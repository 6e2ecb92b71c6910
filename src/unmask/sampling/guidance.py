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
                  attention_mask: torch.Tensor | None = None, logits_slice: slice | None = None) -> torch.Tensor:
    """Logits for canvas x, guided when cfg_scale > 0 (conditional and unconditional rows in one pass)."""
    if cfg_scale > 0:
        x = torch.cat([x, unconditional_canvas(x, prompt_index, mask_id)])
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask])
    logits = forward_logits(model, x, attention_mask, logits_slice)
    if cfg_scale > 0:
        cond, uncond = logits.chunk(2)
        return mix_guidance(cond, uncond, cfg_scale)
    return logits


def forward_logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None,
                   logits_slice: slice | None = None) -> torch.Tensor:
    """`model(x).logits[:, logits_slice]`, asking native models to compute only that slice."""
    from ..models import MaskedDiffusionLM

    if isinstance(model, MaskedDiffusionLM):
        return model(x, attention_mask=attention_mask, logits_slice=logits_slice).logits
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = model(x, **kwargs).logits
    return logits if logits_slice is None else logits[:, logits_slice]
