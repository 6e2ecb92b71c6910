"""unmask: masked diffusion language models with unsupervised classifier-free guidance.

    import unmask
    model, tokenizer = unmask.load()            # the bundled default model, or unmask.load(DIR)
    ids = tokenizer("Mira lives in", return_tensors="pt").input_ids
    out = unmask.generate(model, ids, steps=32, gen_length=32, block_length=32, cfg_scale=1.0)
"""

from __future__ import annotations

import os

from .models import CheckpointError, load_model, load_tokenizer
from .sampling import generate, left_pad

__version__ = "0.1.0"


def load(path: str | os.PathLike | None = None, dtype=None, device=None, trust_remote_code: bool = False):
    """(model, tokenizer) from a local checkpoint directory; None loads the bundled default model."""
    return (load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code),
            load_tokenizer(path, trust_remote_code=trust_remote_code))


__all__ = ["load", "load_model", "load_tokenizer", "generate", "left_pad", "CheckpointError", "__version__"]
