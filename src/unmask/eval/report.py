"""The results table: one row per task and metric, one column per cfg scale, the delta, stderrs.

Accuracies are shown in percent, perplexities as they are; Δ is the last column minus the first
(with `--cfg-scale auto`: the tuned scale minus w = 0, on the test items).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .runner import MetricValue, TaskResult


def _fmt(metric: str, v: MetricValue) -> str:
    scale = 1.0 if metric == "ppl" else 100.0
    return f"{v.value * scale:.2f} ± {v.stderr * scale:.2f}"


def _delta(metric: str, values: list[MetricValue]) -> str:
    scale = 1.0 if metric == "ppl" else 100.0
    return f"{(values[-1].value - values[0].value) * scale:+.2f}"


def markdown_table(results: list[TaskResult]) -> str:
    if not results:
        return ""
    columns = results[0].columns
    auto = any(r.chosen_scale is not None for r in results)
    head = ["task", "metric", "n", *columns, "Δ", *(["auto w", "dev n"] if auto else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for metric, values in r.metrics.items():
            cells = [r.task, metric + (" ↓" if metric == "ppl" else ""), str(r.n),
                     *(_fmt(metric, v) for v in values), _delta(metric, values)]
            if auto:
                cells += [f"{r.chosen_scale:g}", str(r.dev.n if r.dev else 0)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dev_table(results: list[TaskResult]) -> str:
    """With auto: the dev slice at every grid scale (what the choice was made on)."""
    dev = [r.dev for r in results if r.dev is not None]
    return markdown_table(dev) if dev else ""


def write_report(results: list[TaskResult], out_dir: str | Path, meta: dict | None = None) -> tuple[Path, Path]:
    """Write results.json (everything, incl. dev slices and run settings) and results.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps({"meta": meta or {}, "results": [asdict(r) for r in results]}, indent=2))
    text = markdown_table(results) + "\n"
    if dev_table(results):
        text += "\nDev slice (used to pick the auto scale):\n\n" + dev_table(results) + "\n"
    md_path.write_text(text)
    return json_path, md_path
