"""`unmask bench`: time the sampler's modes against the plain reference on one model (see unmask.bench).

Under `torchrun --nproc-per-node N` with --tp N every rank runs every mode on its shard and rank 0
prints the table (its own timings: the ranks step together).
"""

from __future__ import annotations

import argparse

from .generate import add_adapter_arg, add_parallel_args, base_model, check_tensor_parallel, expert_parallel


def register(subparsers) -> None:
    from ..bench import BLOCK_MODES, MODES, SHAPES  # light: no model is built at import

    p = subparsers.add_parser(
        "bench", help="throughput of the sampling modes against the plain reference",
        description="Run the reference sampler and unmask's modes on the same model and prompts; print "
                    "tokens/s, forward passes per token, speedup and token agreement with the exact output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default on a CPU: the bundled model)")
    p.add_argument("--shape", choices=list(SHAPES),
                   help="random weights of this shape instead of a checkpoint (default on a GPU: llada-8b; "
                        "on a CPU without the bundled model: bundled)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=None,
                   help="random prompt tokens (default: 64, or a quarter of a context under 320 tokens)")
    p.add_argument("--gen-length", type=int, default=None,
                   help="tokens to generate (default: 256, or what fits the rest of a context under 320 tokens)")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, help="sampling steps of the schedule modes (default: gen-length; "
                                             "for block-diffusion models steps per block, default block-length)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance of the +cfg modes")
    p.add_argument("--guidance", default="constant,prompt", metavar="FORM",
                   help="the form of CFG of the +cfg modes, e.g. linear or span:0:-4 (docs/guidance.md)")
    p.add_argument("--modes", nargs="+", choices=list(MODES) + list(BLOCK_MODES),
                   help="default: every mode of the model's family; on a CPU, every mode but the CUDA-graph ones "
                        "(block-diffusion models: the 'block ...' modes)")
    p.add_argument("--agreement", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the exact outputs to report token agreement (costs an exact run per guidance "
                        "scale and batch size; random weights make it of little meaning)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (or fp32, bf16, fp16); "
                                   "default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--quantize", metavar="int8",
                   help="int8: time the modes with 8-bit linear weights (torchao), after measuring their logit "
                        "error and token agreement against the unquantized weights (docs/quantize.md)")
    add_adapter_arg(p)
    add_parallel_args(p)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median), after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", action="store_true",
                   help="add each mode's accuracy on the bundled suite (know_lambada, know_arc) by generation; "
                        "needs the checkpoint's tokenizer (--model or the bundled model)")
    p.add_argument("--suite-items", type=int, default=100, help="items per suite task with --suite")
    p.add_argument("--json", help="write the rows and settings as JSON here")
    p.add_argument("--markdown", help="write the table as Markdown here")
    p.set_defaults(func=run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bench_model_dir(model_dir: str | None, shape: str | None, device: str = "cpu"):
    """The checkpoint to bench: `model_dir`, else on a CPU the bundled model if installed; None: random weights.

    On a GPU the default is random weights of a real shape (`default_shape`): the bundled model is
    too small to say anything about GPU throughput.
    """
    from ..models import DEFAULT_MODEL_DIR

    if model_dir is not None and shape is None:
        return model_dir
    if shape is None and not _is_gpu(device) and (DEFAULT_MODEL_DIR / "config.json").exists():
        return DEFAULT_MODEL_DIR
    return None


def default_shape(device: str) -> str:
    return "llada-8b" if _is_gpu(device) else "bundled"


def _is_gpu(device: str) -> bool:
    return not str(device).startswith("cpu")


def bench_modes(args, device, block_diffusion: bool) -> list[str]:
    """--modes, else every mode of the family the device runs; with --ep not the CUDA-graph ones
    (expert parallelism reads each MoE layer's counts on the host, which a graph cannot capture)."""
    from ..bench import MODES, default_modes

    modes = args.modes or default_modes(device, block_diffusion)
    graphs = [m for m in modes if MODES.get(m, {}).get("cuda_graph")]
    if graphs and args.ep is not None:
        if args.modes:
            raise ValueError(f"mode {graphs[0]!r} captures CUDA graphs, which --ep does not allow: drop it or --ep")
        modes = [m for m in modes if m not in graphs]
    return modes


def bench_config(model_dir: str | None, shape: str | None, device):
    """The config of what will be benched, read before any weights are."""
    from ..bench import SHAPES
    from ..models import load_config

    checkpoint = bench_model_dir(model_dir, shape, device)
    return load_config(checkpoint) if checkpoint is not None else SHAPES[shape or default_shape(device)]


def default_lengths(context: int, block_length: int, prompt_len: int | None,
                    gen_length: int | None) -> tuple[int, int]:
    """(prompt_len, gen_length) with the unset ones filled: 64 and 256 (the GPU tables' shape) where
    the context holds them; on a smaller context (the bundled model's 128) a quarter of it for the
    prompt and, for the generation, the largest multiple of block_length in what is left, so a
    plain `unmask bench` runs on any model. A given value is never changed."""
    if prompt_len is None:
        prompt_len = 64 if context >= 320 else context // 4
    if gen_length is None:
        room = min(256, context - prompt_len)
        gen_length = max(block_length, room // block_length * block_length)
    return prompt_len, gen_length


def bench_is_block_diffusion(model_dir: str | None, shape: str | None, device) -> bool:
    """The family of what will be benched, known before any model is built."""
    from ..bench import SHAPES
    from ..sampling.blocks import BLOCK_DIFFUSION_LAYOUTS, is_block_checkpoint

    checkpoint = bench_model_dir(model_dir, shape, device)
    if checkpoint is not None:
        return is_block_checkpoint(checkpoint)
    return SHAPES[shape or default_shape(device)].layout in BLOCK_DIFFUSION_LAYOUTS


def load_bench_model(model_dir: str | None, shape: str | None, device: str, dtype, adapter: str | None = None,
                     mesh=None, expert_parallel: bool = False):
    """(model, name): the checkpoint (with `adapter` merged), else the bundled model (CPU), else random
    weights of a shape; with a mesh, this rank's shard (random weights are built whole, then sharded)."""
    from ..bench import SHAPES, random_model
    from ..models import load_model
    from ..models.parallel import parallelize

    checkpoint = bench_model_dir(model_dir, shape, device)
    if checkpoint is not None:
        name = f"{checkpoint} + adapter {adapter}" if adapter else str(checkpoint)
        return load_model(checkpoint, dtype=dtype, device=device, adapter=adapter, mesh=mesh,
                          expert_parallel=expert_parallel), name
    if adapter:
        raise ValueError("--adapter needs the model it was trained on (--model DIR), not random --shape weights")
    shape = shape or default_shape(device)
    model = random_model(SHAPES[shape], device, dtype)
    return (model if mesh is None else parallelize(model, mesh, expert_parallel)), f"random {shape}"


def quantize_for_bench(model, cfg, quantize: str):
    """(quantized model, its error against `model`): a copy is quantized and compared; the caller then
    drops `model` (both are held for the comparison: 1.5× the bf16 bytes)."""
    import copy

    from ..bench import quantization_error
    from ..models import quantize_model

    quantized = quantize_model(copy.deepcopy(model), quantize)
    return quantized, quantization_error(model, quantized, cfg)


def load_suite_tokenizer(args):
    """The checkpoint's tokenizer for --suite, checked before any model is built: random weights have none."""
    from ..models import DEFAULT_MODEL_DIR, load_tokenizer

    if args.suite_items < 1:
        raise ValueError("--suite-items must be >= 1")
    checkpoint = bench_model_dir(base_model(args), args.shape, args.device)
    if checkpoint is None:
        raise ValueError("--suite needs a tokenizer: pass --model DIR (a checkpoint with its tokenizer, e.g. "
                         f"{DEFAULT_MODEL_DIR}); random --shape weights, the default on a GPU, have none")
    return load_tokenizer(checkpoint)


def run(args) -> int:
    import torch

    from ..bench import BenchConfig, bench_meta, run_bench, table_header, write_outputs
    from ..models.parallel import is_first_rank, join_tensor_parallel
    from ..models.placement import resolve_device, resolve_dtype
    from ..models.quantize import check_quantize

    check_quantize(args.quantize)
    device = resolve_device(args.device)
    path = base_model(args)
    block = bench_is_block_diffusion(path, args.shape, device)
    config = bench_config(path, args.shape, device)
    if args.tp != 1 or args.ep is not None:
        check_tensor_parallel(args, config=config)
    prompt_len, gen_length = default_lengths(config.max_seq_len, args.block_length, args.prompt_len, args.gen_length)
    cfg = BenchConfig(batch_sizes=args.batch_sizes, prompt_len=prompt_len, gen_length=gen_length,
                      block_length=args.block_length, steps=args.steps, cfg_scale=args.cfg_scale,
                      guidance=args.guidance,
                      repeats=args.repeats, modes=bench_modes(args, device, block), seed=args.seed,
                      agreement=args.agreement,
                      suite_items=args.suite_items if args.suite else 0).check(device, block)
    tokenizer = load_suite_tokenizer(args) if args.suite else None
    dtype = resolve_dtype(args.dtype) or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    mesh, device = join_tensor_parallel(args.tp, device)
    model, name = load_bench_model(path, args.shape, device, dtype, args.adapter, mesh, expert_parallel(args))
    error = None
    if args.quantize:
        model, error = quantize_for_bench(model, cfg, args.quantize)
    meta = bench_meta(model, cfg, name, dtype, args.quantize, error) | {"tp": args.tp, "ep": args.ep}
    if not is_first_rank():   # the same calls as rank 0, in step with it; rank 0 reports
        run_bench(model, cfg, progress=lambda row: None, tokenizer=tokenizer)
        return 0
    sharded = f", sharded over {args.tp} ranks{' (experts whole)' if args.ep else ''}" if args.tp > 1 else ""
    print(f"unmask bench: {name}, {meta['parameters']:,} parameters, {meta['dtype']} on {meta['device']}{sharded}")
    if args.quantize:
        from ..bench import format_quantization_error

        print(format_quantization_error(error, args.quantize, dtype))
    if args.suite:
        print(f"suite: {args.suite_items} items each of know_lambada and know_arc per mode, by generation")
    print(table_header(args.suite))
    rows = run_bench(model, cfg, tokenizer=tokenizer)
    write_outputs(rows, meta, args.json, args.markdown)
    if args.markdown:
        print(f"wrote {args.markdown}")
    return 0
