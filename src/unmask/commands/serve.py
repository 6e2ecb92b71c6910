"""`unmask serve` (the OpenAI-compatible server) and `unmask loadtest` (a bounded load generator)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from pathlib import Path

from .generate import add_adapter_arg, add_parallel_args, check_tensor_parallel, expert_parallel


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a live web view",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the --adapter's name, or with several adapters or none "
                        "the --model's directory name, or 'unmask' for the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the server")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: float32 on cpu, bfloat16 elsewhere)")
    p.add_argument("--quantize", default=None, metavar="int8",
                   help="int8: 8-bit linear weights via torchao (pip install \"unmask[quant]\"; docs/quantize.md)")
    add_adapter_arg(p, several=True)
    add_parallel_args(p)   # with --tp N, rank 0 serves HTTP and the other ranks follow its batches
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=64, help="max_tokens when a request gives none")
    p.add_argument("--block-length", type=int, default=32,
                   help="preferred block length when a request gives none; for LLaDA2.x models the block length")
    p.add_argument("--steps", type=int, default=None,
                   help="default steps (default: one per generated token); for LLaDA2.x models steps per block "
                        "(default: 32)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="default guidance scale w (0 = off)")
    p.add_argument("--guidance", default=None, metavar="FORM",
                   help="default form of CFG, e.g. linear, span:0:-4, acfg:0.7 (docs/guidance.md)")
    p.add_argument("--temperature", type=float, default=0.0, help="default temperature")
    p.add_argument("--remasking", default=None,
                   help="default remasking rule (default: low_confidence; LLaDA models only)")
    p.add_argument("--cache", choices=["prefix", "dual"], default=None,
                   help="default approximate KV cache (default: off, or dual with --cuda-graph; LLaDA models only)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, replay dual-cache steps as CUDA graphs; batches are padded to a few fixed shapes "
                        "(LLaDA models only)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="most rows in one denoising step (requests join and leave between steps)")
    p.add_argument("--max-batch-tokens", type=int, default=32768,
                   help="most canvas tokens (prompt + max_tokens, twice when guided) in one step")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long an idle server waits for batch-mates; before a whole-call group (--cuda-graph) "
                        "again while they keep arriving (at most 5 windows, or until a full batch waits)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies are refused (413)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive before the request is refused (408)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections at most; a request over the limit is answered 503")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*; when not given, $UNMASK_API_KEY if set")
    p.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="web origins allowed to call the API from a browser (CORS), e.g. https://app.example")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds to let accepted requests finish before ending them")
    p.set_defaults(func=serve)

    p = subparsers.add_parser("loadtest", help="send concurrent chat requests to a server and report latency",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8],
                   help="requests in flight at once; several values run one test each, one table row per value")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency (at most 10000)")
    p.add_argument("--warmup", type=int, default=0,
                   help="requests sent first at each concurrency and not counted (e.g. while CUDA graphs are captured)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default="Tell me about the river.")
    p.add_argument("--stream", action="store_true", help="stream responses (also reports time to first text)")
    p.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds (per concurrency)")
    p.add_argument("--allow-remote", action="store_true", help="allow a URL that is not loopback")
    p.add_argument("--api-key", default=None, help="the server's API key; when not given, $UNMASK_API_KEY if set")
    p.add_argument("--open-loop", action="store_true",
                   help="requests arrive on their own clock (Poisson at --rate, or a trace's times), "
                        "streaming; reports throughput, latency and time to first text")
    p.add_argument("--rate", type=float, default=None, help="--open-loop: arrivals per second (Poisson)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--trace", default=None, metavar="FILE",
                        help="--open-loop: JSON lines of requests (prompt, max_tokens, temperature, cfg_scale, seed, "
                             "optionally 'at' seconds)")
    source.add_argument("--preset", choices=["mixed"], default=None,
                        help="--open-loop: --requests generated requests with mixed max_tokens/temperature/cfg_scale")
    p.add_argument("--seed", type=int, default=0, help="--open-loop: seed of the arrivals and the preset")
    p.set_defaults(func=loadtest)


def serve(args) -> int:
    """Check every setting (under the rules of the checkpoint's family) and bind the port, then load
    the model, then serve until a signal drains it. Exits 1 when a second signal cut requests off."""
    import torch

    from .. import load
    from ..models.adapters import AdapterSet
    from ..models.placement import resolve_device, resolve_dtype
    from ..models.quantize import check_quantize
    from ..serve import ServeConfig, create_app
    from ..sampling.blocks import is_block_checkpoint
    from ..serve.lifecycle import bind

    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    adapters = served_adapters(args.adapter)
    path = adapters_base(args.model, adapters)
    merged = next(iter(adapters.values())) if len(adapters) == 1 else None   # one adapter: merged at load
    if len(adapters) == 1:
        name = args.served_model_name or next(iter(adapters))
    else:
        name = args.served_model_name or (Path(path).resolve().name if path else "unmask")
        if adapters:
            _check_several_adapters(args, adapters, name)
    api_key = _api_key(args)
    config = ServeConfig(model_name=name, max_tokens_limit=args.max_tokens_limit,
                         default_max_tokens=args.default_max_tokens, block_length=args.block_length,
                         steps=args.steps, cfg_scale=args.cfg_scale, guidance=args.guidance,
                         temperature=args.temperature,
                         remasking=args.remasking, cache=args.cache, cuda_graph=args.cuda_graph,
                         max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                         max_batch_tokens=args.max_batch_tokens,
                         batch_window_ms=args.batch_window_ms, timeout_s=args.timeout,
                         max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout,
                         body_timeout_s=args.body_timeout, max_connections=args.max_connections, api_key=api_key,
                         allowed_origins=tuple(args.allowed_origins),
                         shutdown_grace_s=args.shutdown_grace).check(is_block_checkpoint(path), device)
    dtype = resolve_dtype(args.dtype)
    quantize = check_quantize(args.quantize)
    if args.tp != 1 or args.ep is not None:
        return _serve_tensor_parallel(args, config, device, dtype, path, merged)
    sock = bind(args.host, args.port)
    model, tokenizer = load(path, dtype=dtype, device=device, quantize=quantize, adapter=merged)
    held = AdapterSet(model, adapters) if len(adapters) > 1 else None
    app = create_app(model, tokenizer, config, held)
    return _announce_and_run(app, args, device, sock, config)


def served_adapters(values: list[str] | None) -> dict[str, str]:
    """--adapter's values as {served name: directory}: NAME=DIR, or DIR named by its directory
    (a value that is an existing path is a DIR, even with an '=' in it)."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, directory = value.partition("=")
        if not sep or not name or "/" in name or os.path.exists(value):
            name, directory = Path(value).resolve().name, value
        if not directory:
            raise ValueError(f"--adapter {value}: give the adapter's directory after '=' (NAME=DIR)")
        if name in adapters:
            raise ValueError(f"two adapters are named {name!r}: name them apart with --adapter NAME=DIR")
        adapters[name] = directory
    return adapters


def adapters_base(model: str | None, adapters: dict[str, str]) -> str | None:
    """The base checkpoint: --model, or the one base every adapter records (None: the bundled model)."""
    from ..models.loading import base_checkpoint

    if model is not None or not adapters:
        return model
    bases = {name: base_checkpoint(None, directory) for name, directory in adapters.items()}
    if len({None if b is None else Path(b).resolve() for b in bases.values()}) > 1:
        listed = ", ".join(f"{name}: {base}" for name, base in bases.items())
        raise ValueError(f"the adapters record different base models ({listed}): pass the base with --model")
    return next(iter(bases.values()))


def _check_several_adapters(args, adapters: dict[str, str], base_name: str) -> None:
    """What several adapters beside one base do not combine with, before anything is loaded."""
    if base_name in adapters:
        raise ValueError(f"the adapter {base_name!r} has the base model's served name: rename it (--adapter "
                         "NAME=DIR) or the base (--served-model-name)")
    for flag, value in (("--tp", args.tp != 1), ("--cuda-graph", args.cuda_graph)):
        if value:   # a captured graph would replay the adapter it was captured with
            raise ValueError(f"several adapters in one server do not combine with {flag} yet: serve one adapter "
                             "(merged), or drop " + flag)


def _announce_and_run(app, args, device, sock, config) -> int:
    """Say what is served where, then serve until a signal drains it: 0, or 1 when a second signal
    cut requests off."""
    from ..serve.lifecycle import run

    name = config.model_name
    family = " (block diffusion)" if app.state.server.block_diffusion else ""
    print(f"unmask serve: model {name!r}{family} on {device}; open http://{args.host}:{args.port}/ for the live view",
          flush=True)
    if config.api_key is None and not _is_loopback(args.host):
        print(f"unmask serve: warning: {args.host} is reachable from other machines and no --api-key is set",
              flush=True)
    return 0 if run(app, sock, config.shutdown_grace_s) else 1


def _serve_tensor_parallel(args, config, device, dtype, path, adapter) -> int:
    """Under torchrun: every rank loads its shard; rank 0 binds and serves, the others follow its
    batches (`serve.tensor_parallel`). Exits 1 with a message when a rank was lost."""
    import sys

    from ..models import load_model, load_tokenizer
    from ..models.parallel import is_first_rank, join_tensor_parallel
    from ..serve import create_app
    from ..serve.lifecycle import bind
    from ..serve.tensor_parallel import BATCH_TIMEOUT, GroupLost, Leader, announcement_group, follow

    check_tensor_parallel(args, path, also=("--cuda-graph",))
    mesh, device = join_tensor_parallel(args.tp, device, timeout=BATCH_TIMEOUT)
    group = announcement_group()
    sock = bind(args.host, args.port) if is_first_rank() else None
    model = load_model(path, dtype=dtype, device=device, adapter=adapter, mesh=mesh,
                       expert_parallel=expert_parallel(args))
    if not is_first_rank():
        try:
            follow(model, device, group)
        except GroupLost as e:
            print(f"unmask serve: rank {mesh.get_local_rank()} stops: {e}", file=sys.stderr, flush=True)
            return 1
        return 0
    app = create_app(model, load_tokenizer(path), config)
    runner = app.state.server.runner
    runner.sampler = leader = Leader(runner.sampler, device, group)
    status = _announce_and_run(app, args, device, sock, config)
    leader.close()
    if leader.lost:
        print(f"unmask serve: stopped: {leader.lost}", file=sys.stderr, flush=True)
        return 1
    return status


def _api_key(args) -> str | None:
    """--api-key, else $UNMASK_API_KEY (which keeps the key out of the process list), else none."""
    return args.api_key if args.api_key is not None else os.environ.get("UNMASK_API_KEY") or None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loadtest(args) -> int:
    from ..serve.loadtest import LoadTest, format_levels, run_levels

    cfg = LoadTest(url=args.url, requests=args.requests, max_tokens=args.max_tokens, prompt=args.prompt,
                   stream=args.stream, duration_s=args.duration, allow_remote=args.allow_remote,
                   api_key=_api_key(args), warmup=args.warmup)
    if args.open_loop or args.trace or args.preset or args.rate is not None:
        return _open_loop(args, cfg)
    reports = run_levels(cfg, args.concurrency)
    print(reports[0].format() if len(reports) == 1 else format_levels(reports))
    return 0 if all(r.errors == 0 for r in reports) else 1


def _open_loop(args, cfg) -> int:
    """`unmask loadtest --open-loop`: a trace (a file, or the mixed preset at --rate) sent on its own clock."""
    from ..serve.loadtest import mixed_trace, read_trace, run_open_loop

    if not args.open_loop:
        raise ValueError("--rate, --trace and --preset are for --open-loop: add it")
    if args.rate is not None and not (args.rate > 0 and math.isfinite(args.rate)):
        raise ValueError(f"--rate must be a positive number of requests per second (got {args.rate})")
    if args.trace:
        trace = read_trace(args.trace, args.rate, args.seed)
    elif args.preset:
        if args.rate is None:
            raise ValueError("--preset needs --rate (arrivals per second)")
        trace = mixed_trace(args.requests, args.rate, args.seed)
    else:
        raise ValueError("--open-loop needs --trace FILE or --preset mixed")
    report = run_open_loop(cfg, trace)
    print(report.format())
    return 0 if report.errors == 0 else 1
