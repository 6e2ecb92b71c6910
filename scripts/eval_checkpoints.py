"""Accuracy against training tokens: every checkpoint of a run on the bundled suite, at several w.

For each `step-*` directory of a training run, the bundled world suite is scored exactly as
`unmask eval` scores it (chain-rule likelihood, the same seed), at every cfg scale; the tokens a
checkpoint has seen are its step × batch_size × grad_accum × seq_len (from the run's
train_config.json). Writes OUT.json (every checkpoint's table) and OUT.png (one panel per task,
one line per w, accuracy in percent against tokens), and prints a Markdown table.

Usage: python scripts/eval_checkpoints.py runs/default_model --out docs/default_model_curve
       [--device cuda] [--points 5] [--cfg-scale 0 0.5 1 2] [--tasks world_mc,world_boolq] [--limit N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import unmask
from unmask.eval import DEFAULT_TASKS, EvalConfig, evaluate, get_task


def checkpoints(run: Path, points: int) -> list[Path]:
    """`points` checkpoints evenly spaced over the run, the first and the last among them."""
    found = sorted(p for p in run.glob("step-*") if (p / "config.json").is_file())
    if not found:
        raise SystemExit(f"{run}: no step-* checkpoints (train with keep_last = 0 to keep them all)")
    if len(found) <= points:
        return found
    return [found[round((len(found) - 1) * i / (points - 1))] for i in range(points)]


def tokens_per_step(run: Path) -> int:
    cfg = json.loads((run / "train_config.json").read_text())
    return cfg["batch_size"] * cfg["grad_accum"] * cfg["seq_len"]


def plot(curve: list[dict], scales: list[float], out: Path) -> None:
    from matplotlib.figure import Figure

    tasks = list(curve[0]["acc"])
    fig = Figure(figsize=(3.2 * len(tasks), 3.2))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    tokens = [c["tokens"] / 1e6 for c in curve]
    for ax, task in zip(axes, tasks):
        for s, w in enumerate(scales):
            ax.plot(tokens, [100 * c["acc"][task][s] for c in curve], marker="o", label=f"w={w:g}")
        ax.set_title(task)
        ax.set_ylim(0, 100)  # the whole scale: a difference of a few points looks as small as it is
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="training run directory (holds step-* and train_config.json)")
    ap.add_argument("--out", type=Path, required=True, help="output path without extension (.json, .png)")
    ap.add_argument("--points", type=int, default=5, help="checkpoints to score, evenly spaced (first and last "
                                                          "included; at least 2)")
    ap.add_argument("--cfg-scale", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (weights in float32 either way, so a "
                                                    "GPU's curve scores the checkpoints the CPU would)")
    args = ap.parse_args(argv)
    if args.points < 2:
        ap.error("--points must be at least 2")
    tasks = [get_task(t) for t in args.tasks.split(",")]
    config = EvalConfig(cfg_scales=tuple(args.cfg_scale), mode="chain", limit=args.limit, progress=False)
    per_step = tokens_per_step(args.run)
    curve = []
    for ckpt in checkpoints(args.run, args.points):
        model, tok = unmask.load(ckpt, dtype="float32", device=args.device)
        results = evaluate(model, tok, tasks, None, config)
        step = int(ckpt.name.split("-")[1])
        curve.append({"checkpoint": ckpt.name, "step": step, "tokens": step * per_step,
                      "acc": {r.task: [v.value for v in r.metrics["acc"]] for r in results}})
        print(f"{ckpt.name}: " + "  ".join(f"{t} " + "/".join(f"{100 * a:.1f}" for a in accs)
                                          for t, accs in curve[-1]["acc"].items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"cfg_scales": args.cfg_scale, "curve": curve}, indent=2))
    plot(curve, args.cfg_scale, args.out.with_suffix(".png"))
    head = "| checkpoint | tokens | " + " | ".join(f"{t} w={w:g}" for t in curve[0]["acc"] for w in args.cfg_scale)
    print(head + " |\n|" + "---|" * (2 + len(curve[0]["acc"]) * len(args.cfg_scale)))
    for c in curve:
        cells = [f"{100 * a:.1f}" for accs in c["acc"].values() for a in accs]
        print(f"| {c['checkpoint']} | {c['tokens'] / 1e6:.1f}M | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
