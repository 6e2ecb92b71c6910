"""8-bit weights (`quantize="int8"`): weight-only int8 through torchao, for the GPU's batch-1 step.

At batch 1 a denoising step is bound by reading the weights, so weights in one byte instead of
bf16's two can make it up to twice as fast. Weight-only: activations stay in the model's dtype and
each output row of a weight gets one float scale (symmetric, per channel). torchao, a maintained
library, does the quantizing and the matmul (`Int8WeightOnlyConfig`); unmask has no kernels of its own.

What is quantized: every `nn.Linear` of unmask's transformer — attention (qkv, out), the dense
SwiGLU, the MoE shared experts and the vocabulary projection (lm_head: ~6 % of LLaDA-8B's bytes,
~9 % of the bundled model's, where quantizing it alone moves the logits about half as much as
quantizing every other layer: docs/quantize.md).
What stays in the load dtype, and why:
- MoE routers: the router's scores choose the experts; an error that flips a near-tie sends the
  token to another expert, which changes the MLP output wholesale instead of rounding it. A router
  is E × D, a negligible share of the bytes.
- The routed experts (stacked (E, H, D) tensors run by `grouped_matmul`): torchao's int8 tensor
  has no grouped matmul, and dequantizing the stack before `F.grouped_mm` would read and write
  more bytes than bf16 reads. So int8 shrinks a MoE model's attention, shared expert and head
  only; its experts (most of its bytes) stay bf16 (docs/quantize.md).
- The embedding (a lookup reads T rows, not the matrix) and norms; a head tied to the embedding
  (quantizing it would keep a second copy of the matrix).

torchao's weight-only matmul is `mm(x, w.to(x.dtype)) * scale`: run eagerly it converts each
weight on every call, so the bytes are saved only where torch.compile fuses the conversion into
the matmul (`compile=True`). On a CPU it runs, for tests and the error report, but not faster.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn as nn

QUANTIZE_MODES = ("int8",)
INSTALL_HINT = 'pip install "unmask[quant]"'


def check_quantize(quantize: str | None) -> str | None:
    """`quantize` if it is None or a supported mode and torchao is installed; else a one-line ValueError.

    Cheap (torchao is looked up, not imported), so commands call it before any weights are read.
    """
    if quantize is None:
        return None
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}: use int8 (8-bit weights) or leave it unset")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"quantize={quantize!r} needs torchao, which is not installed: {INSTALL_HINT}")
    return quantize


def _torchao():
    """torchao's `quantize_` and `Int8WeightOnlyConfig`, imported without its log noise.

    Importing torchao logs a "Failed to load ..." warning for each of its CUDA-only kernel
    libraries it cannot load (all of them on a CPU-only install), and torch a deprecation note
    about one of torchao's enums. int8 weight-only uses none of those kernels, so the warnings are
    muted for the import (Python logging, restored after).
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return quantize_, Int8WeightOnlyConfig


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers `quantize_model` converts: every nn.Linear but MoE routers and a tied head."""
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.embed.weight
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("router") and not (tied and name == "lm_head")]


def quantize_model(model: nn.Module, quantize: str | None = "int8") -> nn.Module:
    """Convert `model`'s linear weights in place (see the module docstring for which) and return it.

    Only unmask's own transformer: a --trust-remote-code model's layers are not known here.
    """
    from .transformer import MaskedDiffusionLM

    if check_quantize(quantize) is None:
        return model
    if not isinstance(model, MaskedDiffusionLM):
        raise ValueError(f"quantize={quantize!r} works on unmask's own models, not {type(model).__name__} "
                         "(a --trust-remote-code architecture)")
    quantize_, Int8WeightOnlyConfig = _torchao()
    chosen = set(quantized_layers(model))
    with torch.no_grad():
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name in chosen)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers occupy (a quantized weight: its int8 data and scales);
    what a batch-1 step reads, give or take the embedding rows it skips."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if hasattr(t, "__tensor_flatten__"):   # a tensor subclass such as torchao's Int8Tensor
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).nbytes for n in names)
        else:
            total += t.nbytes
    return total
