"""unmask: masked diffusion language models with unsupervised classifier-free guidance.

    import unmask
    model, tokenizer = unmask.load()            # the bundled default model, or unmask.load(DIR)
    ids = tokenizer("Mira lives in", return_tensors="pt").input_ids
    out = unmask.generate(model, ids, steps=32, gen_length=32, block_length=32, cfg_scale=1.0)
"""

from __future__ import annotations

import os

from .models import CheckpointError, load_model, load_tokenizer
from .models.loading import base_checkpoint
from .sampling import block_generate, is_block_diffusion, left_pad
from .sampling import generate as masked_generate

__version__ = "0.1.0"


def load(path: str | os.PathLike | None = None, dtype=None, device=None, trust_remote_code: bool = False,
         quantize: str | None = None, adapter: str | os.PathLike | None = None):
    """(model, tokenizer) from a local checkpoint directory, a training run directory (the checkpoint
    its `latest` names) or a hub id already in the local Hugging Face cache; None loads the bundled
    default model. Nothing is downloaded. quantize="int8": 8-bit weights (needs torchao,
    docs/quantize.md). adapter=DIR: a LoRA adapter or LoRA training run merged into the weights
    (docs/lora.md); with path None its recorded base model is loaded."""
    path = base_checkpoint(path, adapter)
    return (load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quantize=quantize,
                       adapter=adapter),
            load_tokenizer(path, trust_remote_code=trust_remote_code))


def generate(model, prompt, **kwargs):
    """Sample from `model` with its family's decoding and keywords.

    LLaDA2.x (block-diffusion) models decode block by block with `block_generate`, under the public
    LLaDA2 `generate`'s keywords (gen_length, block_length, steps per block, threshold, minimal_topk,
    eos_early_stop, eos_id, mask_id, temperature, top_k, top_p) plus cfg_scale; every other model
    with the reference LLaDA `generate`'s (steps, gen_length, block_length, temperature, cfg_scale,
    remasking, mask_id, ...). Either way scripts port by changing the import.
    """
    sampler = block_generate if is_block_diffusion(model) else masked_generate
    return sampler(model, prompt, **kwargs)


__all__ = ["load", "load_model", "load_tokenizer", "generate", "left_pad", "CheckpointError", "__version__"]
