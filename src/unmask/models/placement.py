"""Where a model runs and in what precision, from the names people type (`cuda:1`, `bf16`).

Checked before any weights are read, so `--device cuda` on a machine without CUDA or
`--dtype fp8` is one line that says what to use instead, not a traceback after the load.
"""

from __future__ import annotations

import torch

DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or one of the usual names (float32/fp32, bfloat16/bf16, float16/fp16/half)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}: use float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return DTYPE_ALIASES[key]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A torch device that exists on this machine; None is the CPU."""
    try:
        d = torch.device(device if device is not None else "cpu")
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA device that torch can "
                             "use: use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but there are only {torch.cuda.device_count()} CUDA "
                             f"devices (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return d
