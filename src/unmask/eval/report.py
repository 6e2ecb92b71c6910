"""The results table: one row per task and metric, one column per cfg scale, then one paired
comparison per scale against the first column.

Accuracies are shown in percent, perplexities as they are. Each "Δ w" cell is that column minus
the first (w = 0) on the same items, with its paired standard error and the p-value of a paired
test (exact McNemar for accuracies; see `PairedDelta`). With `--cfg-scale auto` the one Δ is the
tuned scale minus w = 0, on the test items. With several guidance forms the columns are labelled
"FORM w=W" (and "pmi CANVAS"), and auto adds the form it picked.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .runner import MetricValue, PairedDelta, TaskResult


def _fmt(metric: str, v: MetricValue) -> str:
    scale = 1.0 if metric == "ppl" else 100.0
    return f"{v.value * scale:.2f} ± {v.stderr * scale:.2f}"


def _delta(metric: str, d: PairedDelta) -> str:
    scale = 1.0 if metric == "ppl" else 100.0
    return f"{d.delta * scale:+.2f} ± {d.stderr * scale:.2f} (p={d.p_value:.2g})"


def markdown_table(results: list[TaskResult]) -> str:
    if not results:
        return ""
    columns = max((r.columns for r in results), key=len)   # a task without a column (pmi on cloze) shows "–"
    auto = any(r.chosen_scale is not None for r in results)
    auto_form = any(r.chosen_form is not None for r in results)
    deltas = [f"Δ {c}" for c in columns[1:]]
    head = ["task", "metric", "n", *columns, *deltas, *(["auto form"] if auto_form else []),
            *(["auto w", "dev n"] if auto else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for metric, values in r.metrics.items():
            value = dict(zip(r.columns, (_fmt(metric, v) for v in values)))
            delta = dict(zip(r.columns[1:], (_delta(metric, d) for d in r.paired[metric])))
            cells = [r.task, metric + (" ↓" if metric == "ppl" else ""), str(r.n),
                     *(value.get(c, "–") for c in columns), *(delta.get(c, "–") for c in columns[1:])]
            if auto_form:
                cells.append(r.chosen_form or "–")
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
