"""Score tasks at several cfg scales, optionally sharded over processes, and aggregate the metrics.

Every cfg scale of an item is mixed from the same forward passes (`score_requests`), so a sweep
costs little more than one scale; only the cloze tasks' greedy check runs the sampler per scale.

`--cfg-scale auto`: the first `dev_fraction` of a task's items (file order, a fixed split) is a
dev slice; the scale of the grid with the best primary metric there (ties: the smaller scale) is
reported on the remaining test items next to w = 0. Dev results are reported separately and the
test items never influence the choice.

Several guidance forms (`--guidance F1 F2 ...`, an ablation): the columns are w = 0 once (no form
acts there; every paired cell is against it), every form at every positive scale, labelled
"FORM w=W", and with PMI one column per distinct unconditional canvas. All of an item's columns
come from the same forward passes: the conditional rows once, one block of unconditional rows per
distinct canvas (`Column`, `score_requests`). With auto the grid is every column, so the dev
slice picks the form and the scale together (ties: the smaller scale, then the form given first).

Sharding: when torch.distributed is initialised (torchrun; gloo on CPU), share r of the items is
those i with i % shares == r, one share per process or, under --tp N, per group of N ranks that hold
one sharded model; the per-item scores are all-gathered. Mask draws are seeded from
(seed, item index, choice index) and an item's requests are always batched together, so the
result is identical to a one-process run whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..likelihood import PMI, Column, Request, greedy_checks, score_requests
from ..sampling.guidance import Guidance
from ..sampling.options import check_scoring_guidance, context_length
from .encoding import encode_pair
from .tasks import Item, Task, load_items

AUTO_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
AUTO_FORMS = ("prompt", "linear", "span:0:-4", "span:-8:")   # `--guidance auto` without forms
NO_FORM = "none"   # the form of the w = 0 column among several forms (no form acts at w = 0)


@dataclass
class EvalConfig:
    cfg_scales: tuple[float, ...] = (0.0, 1.0)   # the columns; with auto, the grid to pick from
    auto: bool = False
    mode: str = "mc"                             # likelihood mode: "mc" or "chain" (see unmask.likelihood)
    mc_num: int = 128
    batch_size: int = 32
    seed: int = 0
    limit: int | None = None
    dev_fraction: float = 0.2
    progress: bool = True
    guidance: str | tuple[str, ...] = "constant,prompt"   # the form of CFG, or several (docs/guidance.md)
    pmi: bool = False                            # add a PMI column (multiple-choice tasks; not with auto)
    tensor_parallel: int = 1                     # ranks per model (--tp): each group of them scores its share


@dataclass
class ItemScore:
    index: int
    loglik: list[list[float]]                    # [scale][request]
    greedy: list[bool] = field(default_factory=list)   # [scale]; cloze tasks only


@dataclass
class MetricValue:
    value: float
    stderr: float


@dataclass
class PairedDelta:
    """A column minus the first column on the same items: the difference, its paired standard
    error, and the two-sided p-value of a paired test (exact McNemar for 0/1 metrics, a paired
    z-test on per-item log-likelihoods for ppl)."""

    delta: float
    stderr: float
    p_value: float


@dataclass
class TaskResult:
    task: str
    n: int
    columns: list[str]
    scales: list[float]
    metrics: dict[str, list[MetricValue]]        # metric -> one value per column
    primary: str
    paired: dict[str, list[PairedDelta]] = field(default_factory=dict)  # metric -> columns[1:] vs columns[0]
    chosen_scale: float | None = None            # auto only
    forms: list[str] = field(default_factory=list)   # several forms only: each column's form
    chosen_form: str | None = None               # auto over several forms only
    dev: TaskResult | None = None                # auto only: the dev slice at every grid scale


def item_seed(seed: int, index: int, choice: int) -> int:
    """Mask-draw seed of one request: a function of the item, never of the process scoring it."""
    return (seed * 1_000_003 + index) * 1_009 + choice


def eval_forms(guidance: str | Guidance | tuple[str, ...]) -> list[Guidance]:
    """The forms of a config, each checked as scoring checks one; a form named twice is refused."""
    specs = [guidance] if isinstance(guidance, (str, Guidance)) else list(guidance)
    if not specs:
        raise ValueError("--guidance needs at least one form, e.g. prompt or span:0:-4")
    forms = [check_scoring_guidance(spec) for spec in specs]
    for i, form in enumerate(forms):
        if form in forms[:i]:
            raise ValueError(f"--guidance names the form {form.short()!r} twice ({specs[forms.index(form)]!r} and "
                             f"{specs[i]!r}): keep one")
    return forms


def task_columns(task: Task, config: EvalConfig) -> tuple[list[Column], list[str], list[str]]:
    """A task's scored columns, their labels, and (several forms only) each column's form."""
    forms = eval_forms(config.guidance)
    pmi = config.pmi and task.kind != "cloze"   # a cloze task is judged by the sampler, which PMI is not
    if len(forms) == 1:
        scales = sorted(set(config.cfg_scales) | ({0.0} if config.auto else set())) + ([PMI] if pmi else [])
        return [Column(w, forms[0]) for w in scales], [_column(w) for w in scales], []
    scales = sorted(w for w in set(config.cfg_scales) if w > 0)
    columns = [Column(0.0)] + [Column(w, form) for form in forms for w in scales]
    if pmi:
        canvases = {form.canvas: form for form in forms}
        columns += [Column(PMI, form) for form in canvases.values()]
    labels = ["w=0"] + [f"{c.guidance.short()} w={c.scale:g}" if c.scale != PMI else f"pmi {c.guidance.canvas}"
                        for c in columns[1:]]
    return columns, labels, [NO_FORM] + [c.guidance.short() for c in columns[1:]]


def score_item(model, tokenizer, task: Task, item: Item, index: int, columns: list[Column],
               config: EvalConfig) -> ItemScore:
    max_len = context_length(model)
    pairs = [encode_pair(tokenizer, ctx, cont, max_len) for ctx, cont in item.requests]
    requests = [Request(ctx, cont, item_seed(config.seed, index, j)) for j, (ctx, cont) in enumerate(pairs)]
    estimates = score_requests(model, requests, cfg_scales=columns, mode=config.mode, mc_num=config.mc_num,
                               batch_size=config.batch_size)
    loglik = [[est[s].value for est in estimates] for s in range(len(columns))]
    greedy = ([greedy_checks(model, [requests[item.gold]], cfg_scale=c.scale, guidance=c.guidance)[0]
               for c in columns] if task.kind == "cloze" else [])
    return ItemScore(index, loglik, greedy)


def item_metrics(task: Task, item: Item, score: ItemScore, s: int) -> dict[str, float]:
    """Per-item metric values at scale index s (lm-eval's process_results)."""
    ll = score.loglik[s]
    if task.kind == "cloze":
        return {"acc": float(score.greedy[s]), "ppl": ll[0]}
    out = {"acc": float(_argmax(ll) == item.gold)}
    if "acc_norm" in task.metrics:
        out["acc_norm"] = float(_argmax([v / n for v, n in zip(ll, item.norm_lengths)]) == item.gold)
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index on ties, as np.argmax


def aggregate(metric: str, values: list[float]) -> MetricValue:
    """Mean with the sample standard error; ppl = exp(−mean log-likelihood), stderr by the delta method."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    if metric == "ppl":
        ppl = math.exp(-mean)
        return MetricValue(ppl, ppl * se)
    return MetricValue(mean, se)


def mcnemar_p(base: list[float], other: list[float]) -> float:
    """Exact two-sided McNemar test of paired 0/1 outcomes: only the discordant items count, and under
    the null each is equally likely to favour either side (a binomial with p = 1/2)."""
    gained = sum(1 for a, b in zip(base, other) if b > a)
    lost = sum(1 for a, b in zip(base, other) if a > b)
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_delta(metric: str, base: list[float], other: list[float]) -> PairedDelta:
    """`other` minus `base` on the same items (see PairedDelta)."""
    diffs = [b - a for a, b in zip(base, other)]
    se = aggregate("acc", diffs).stderr
    if metric == "ppl":  # per-item values are log-likelihoods; report the change of perplexity
        mean = sum(diffs) / len(diffs)
        z = mean / se if se > 0 else 0.0
        p = math.erfc(abs(z) / math.sqrt(2)) if se > 0 else 1.0
        ppl_base, ppl_other = aggregate("ppl", base).value, aggregate("ppl", other).value
        return PairedDelta(ppl_other - ppl_base, ppl_base * se, p)
    return PairedDelta(sum(diffs) / len(diffs), se, mcnemar_p(base, other))


def summarise(task: Task, items: list[Item], scores: list[ItemScore], scale_idx: list[int],
              scales: list[float], columns: list[str], forms: list[str] = ()) -> TaskResult:
    per_item = {m: [[item_metrics(task, items[sc.index], sc, s)[m] for sc in scores] for s in scale_idx]
                for m in task.metrics}
    metrics = {m: [aggregate(m, values) for values in by_scale] for m, by_scale in per_item.items()}
    paired = {m: [paired_delta(m, by_scale[0], values) for values in by_scale[1:]] for m, by_scale in per_item.items()}
    return TaskResult(task.name, len(scores), columns, [scales[s] for s in scale_idx], metrics, task.primary,
                      paired, forms=[forms[s] for s in scale_idx] if forms else [])


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _data_parallel(config: EvalConfig) -> tuple[int, int]:
    """(this process's share, how many shares) of the items: one per copy of the model, i.e. per
    process, or per group of `tensor_parallel` ranks that run one sharded model together."""
    rank, world = rank_and_world()
    return rank // config.tensor_parallel, world // config.tensor_parallel


def _gather(local: list[ItemScore], shares: int) -> list[ItemScore]:
    """Every share's scores, on every rank, in item order (the ranks of one model hold the same ones)."""
    if shares == 1:
        return local
    import torch.distributed as dist

    parts: list[list[ItemScore] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return sorted({s.index: s for part in parts for s in part}.values(), key=lambda s: s.index)


def evaluate_task(model, tokenizer, task: Task, data_dir: str | Path | None, config: EvalConfig) -> TaskResult:
    items = load_items(task, data_dir, config.limit)
    if not items:
        raise ValueError(f"task {task.name}: no items to score")
    columns, labels, forms = task_columns(task, config)
    scales = [c.scale for c in columns]
    rank, world = _data_parallel(config)
    local = range(rank, len(items), world)
    if config.progress and rank_and_world()[0] == 0:
        from tqdm.auto import tqdm

        local = tqdm(local, desc=task.name, unit="item")
    scores = _gather([score_item(model, tokenizer, task, items[i], i, columns, config) for i in local], world)
    if not config.auto:
        return summarise(task, items, scores, list(range(len(scales))), scales, labels, forms)
    if len(items) < 2:
        raise ValueError(f"task {task.name}: --cfg-scale auto needs at least 2 items (a dev and a test slice)")
    n_dev = min(max(1, round(len(items) * config.dev_fraction)), len(items) - 1)
    dev = summarise(task, items, scores[:n_dev], list(range(len(scales))), scales, labels, forms)
    best = max(range(len(scales)), key=lambda s: (dev.metrics[task.primary][s].value, -scales[s], -s))
    result = summarise(task, items, scores[n_dev:], [scales.index(0.0), best], scales, ["w=0", "auto"], forms)
    result.chosen_scale, result.dev = scales[best], dev
    result.chosen_form = forms[best] if forms else None
    return result


def _column(w: float | str) -> str:
    return w if w == PMI else f"w={w:g}"


def evaluate(model, tokenizer, tasks: list[Task], data_dir: str | Path | None, config: EvalConfig) -> list[TaskResult]:
    return [evaluate_task(model, tokenizer, task, data_dir, config) for task in tasks]
