"""`unmask eval`: zero-shot tasks at several cfg scales -> results.json + results.md.

With no --tasks it runs the bundled world suite on the bundled model. Under torchrun the items
are sharded across processes (gloo on CPU, nccl on CUDA) and rank 0 writes the report; with
--tp N the model is sharded over each group of N processes, and the items across the groups
(N processes: one sharded model scoring every item; 2N: two copies, each half the items).
"""

from __future__ import annotations

import os

from .generate import add_model_args, add_parallel_args, base_model, load_for_args, model_placement

DEFAULT_SCALES = (0.0, 1.0)


def register(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot evaluation with and without unsupervised CFG")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names (default: the bundled know_* suite); see docs/eval.md")
    p.add_argument("--cfg-scale", nargs="+", default=None, metavar="W",
                   help="cfg scales to report (default: 0 1.0), or 'auto [GRID...]' to pick one per task "
                        "on a dev slice")
    p.add_argument("--guidance", nargs="+", default=["constant,prompt"], metavar="FORM",
                   help="the form of CFG: schedule and unconditional canvas, e.g. linear or span:0:-4 "
                        "(docs/guidance.md; acfg does not score); several forms: every form at every scale, "
                        "sharing the conditional passes, paired against w = 0; 'auto [FORM...]' picks the "
                        "form and scale per task on the dev slice")
    p.add_argument("--pmi", action="store_true",
                   help="add a PMI column (bound with the context minus bound with it masked): the "
                        "calibration baseline for CFG scoring, multiple-choice tasks only")
    add_model_args(p)
    add_parallel_args(p)
    p.add_argument("--data-dir", default=None, help="directory with <task>.jsonl/.parquet files")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--mode", choices=["mc", "chain"], default=None,
                   help="likelihood: Monte Carlo bound (mc, LLaDA's protocol) or chain rule (chain, SMDM's for "
                        "short answers). Default: chain for bundled tasks (minutes on a CPU), mc otherwise")
    p.add_argument("--mc-num", type=int, default=128, help="Monte Carlo samples per continuation")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (doubled under CFG)")
    p.add_argument("--dev-fraction", type=float, default=0.2, help="dev slice for --cfg-scale auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval_results", help="output directory (results.json, results.md)")
    p.set_defaults(func=run_eval)


def parse_scales(values: list[str] | None) -> tuple[tuple[float, ...], bool]:
    """(scales, auto) from --cfg-scale: numbers, or 'auto' optionally followed by the grid."""
    from ..eval.runner import AUTO_GRID
    from ..sampling.options import check_cfg_scale

    if not values:
        return DEFAULT_SCALES, False
    auto = values[0] == "auto"
    numbers = values[1:] if auto else values
    try:
        scales = tuple(float(v) for v in numbers)
    except ValueError:
        raise ValueError(f"--cfg-scale takes numbers or 'auto' followed by numbers, got {' '.join(values)}") from None
    for w in scales:
        check_cfg_scale(w)
    return (scales or AUTO_GRID) if auto else scales, auto


def parse_forms(values: list[str]) -> tuple[str | tuple[str, ...], bool]:
    """(forms, auto) from --guidance: one form (kept a string, as the single-form report has it), several,
    or 'auto' optionally followed by the forms to pick from. Each is checked by `eval_forms`."""
    from ..eval.runner import AUTO_FORMS, eval_forms

    auto = values[0] == "auto"
    specs = tuple(values[1:] if auto else values) or (AUTO_FORMS if auto else ())
    eval_forms(specs)
    return (specs[0] if len(specs) == 1 else specs), auto


def _init_distributed(device: str) -> None:
    """Join the torchrun process group when launched by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def run_eval(args) -> int:
    from ..eval import DEFAULT_TASKS, EvalConfig, evaluate, get_task, markdown_table, write_report
    from ..eval.runner import AUTO_GRID, rank_and_world

    scales, scale_auto = parse_scales(args.cfg_scale)
    guidance, form_auto = parse_forms(args.guidance)
    if form_auto and not args.cfg_scale:
        scales = AUTO_GRID
    auto = scale_auto or form_auto
    if args.pmi and auto:
        raise ValueError("--pmi adds a fixed column; auto (--cfg-scale auto, --guidance auto) picks one column "
                         "per task: use one of them")
    names = args.tasks.split(",") if args.tasks else DEFAULT_TASKS
    tasks = [get_task(n.strip()) for n in names if n.strip()]
    mode = args.mode or ("chain" if all(t.bundled for t in tasks) else "mc")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    device, dtype = model_placement(args)
    if args.tp == 1:   # under torchrun without --tp: the items are split across the processes
        _init_distributed(device.type)
    path = base_model(args)
    model, tokenizer = load_for_args(args, replicas=True)   # with --tp: joins the group, loads this rank's shard
    config = EvalConfig(cfg_scales=scales, auto=auto, mode=mode, mc_num=args.mc_num,
                        batch_size=args.batch_size, seed=args.seed, limit=args.limit,
                        dev_fraction=args.dev_fraction, guidance=guidance, pmi=args.pmi,
                        tensor_parallel=args.tp)
    results = evaluate(model, tokenizer, tasks, args.data_dir, config)
    if rank_and_world()[0] == 0:
        meta = {"model": str(path or "bundled"), "cfg_scales": list(scales), "auto": auto,
                "guidance": guidance if isinstance(guidance, str) else list(guidance), "pmi": args.pmi,
                "mode": mode, "mc_num": args.mc_num, "seed": args.seed, "limit": args.limit,
                "world_size": rank_and_world()[1], "tp": args.tp, "quantize": args.quantize,
                "adapter": args.adapter and str(args.adapter)}
        json_path, md_path = write_report(results, args.out, meta)
        print(markdown_table(results))
        print(f"\nwrote {json_path} and {md_path}")
    return 0
