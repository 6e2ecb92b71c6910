"""`unmask merge`: fold a LoRA adapter into its base model and write a plain checkpoint.

The result is an ordinary checkpoint directory (config.json, model.safetensors, the tokenizer) in
the base model's public layout: it loads anywhere a model does, without peft, at the base's speed.
"""

from __future__ import annotations

import argparse

from .generate import base_model

HELP = "merge a LoRA adapter into its base model and write a plain checkpoint"


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="base checkpoint directory (default: the base the adapter records)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="LoRA adapter directory or LoRA training run")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not hold a checkpoint)")
    p.add_argument("--dtype", default=None,
                   help="dtype of the written weights: float32 (default), bfloat16 or float16; the merge itself "
                        "runs in float32")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..models import load_model, save_model
    from ..models.placement import resolve_dtype

    out = Path(args.out)
    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds a checkpoint; pass another --out")
    dtype = resolve_dtype(args.dtype)
    base = base_model(args)
    model = load_model(base, dtype=torch.float32, adapter=args.adapter)
    save_model(model, out, dtype=dtype)
    _tokenizer(base, args.adapter).save_pretrained(out)
    print(f"unmask merge: {args.adapter} merged into {base or 'the bundled model'}: wrote {out}")
    return 0


def _tokenizer(base, adapter):
    """The base checkpoint's tokenizer, else the adapter's (a LoRA training checkpoint carries one)."""
    from ..models import CheckpointError, load_tokenizer
    from ..models.adapters import resolve_adapter_dir

    try:
        return load_tokenizer(base)
    except CheckpointError:
        return load_tokenizer(resolve_adapter_dir(adapter))
