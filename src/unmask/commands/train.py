"""`unmask train`: pretrain or fine-tune a masked diffusion LM (thin layer over unmask.train).

Settings come from TrainConfig's defaults, then a recipe TOML file (`--config`, keys are
TrainConfig field names), then the flags given on the command line; every flag is generated from a
TrainConfig field, so the recipe keys, the flags and the library never drift apart.
Under `torchrun --nproc_per_node=N unmask train ...` it trains data-parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

HELP = "train a masked diffusion LM (pretraining or SFT), resumable, single or multi-process"


def _flag_type(hint) -> type:
    """The argparse type of a TrainConfig annotation such as `int`, `str | None`, `list[str]`."""
    if typing.get_origin(hint) is list:
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def register(subparsers) -> None:
    from ..train.trainer import TrainConfig

    p = subparsers.add_parser("train", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="RECIPE.toml", help="recipe file whose keys are the settings below")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _flag_type(hints[f.name])
        meta = dict(f.metadata)
        helptext = meta.pop("help")
        flag = ["--" + f.name.replace("_", "-"), *meta.pop("aliases", [])]
        if f.name == "resume":
            p.add_argument(*flag, nargs="?", const="auto", default=argparse.SUPPRESS,
                           help=helptext + " (bare --resume means auto)")
        elif kind is bool:
            p.add_argument(*flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{helptext} (default {f.default})")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            p.add_argument(*flag, type=kind, default=argparse.SUPPRESS, help=f"{helptext} (default {default})", **meta)
    p.set_defaults(func=run)


def load_recipe(path: str) -> dict:
    import tomllib

    from ..train.trainer import TrainConfig

    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid keys are TrainConfig fields "
                         "(see unmask train --help, with - written as _)")
    return recipe


def config_from_args(args: argparse.Namespace):
    from ..train.trainer import TrainConfig

    settings = load_recipe(args.config) if args.config else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    settings.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig(**settings)


def run(args: argparse.Namespace) -> int:
    """Train; a full, read-only or unwritable disk is one line (`checkpoint.disk_error_message`)."""
    from pathlib import Path

    from ..cli import UserError
    from ..train.checkpoint import disk_error_message
    from ..train.trainer import train

    config = config_from_args(args)
    if config.dry_run:
        from ..train.memory import dry_run

        print(dry_run(config))
        return 0
    try:
        result = train(config)
    except Exception as e:
        message = disk_error_message(e, Path(config.out_dir))
        if message is None:
            raise
        raise UserError(message) from None
    return 130 if result.interrupted else 0
