"""`unmask serve` (the OpenAI-compatible server) and `unmask loadtest` (a bounded load generator)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a live web view",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send (default: the directory name, or 'unmask' for the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the server")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: float32 on cpu, bfloat16 elsewhere)")
    p.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=64, help="max_tokens when a request gives none")
    p.add_argument("--block-length", type=int, default=32, help="preferred block length when a request gives none")
    p.add_argument("--steps", type=int, default=None, help="default steps (default: one per generated token)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="default guidance scale w (0 = off)")
    p.add_argument("--temperature", type=float, default=0.0, help="default temperature")
    p.add_argument("--remasking", default="low_confidence", help="default remasking rule")
    p.add_argument("--max-batch-size", type=int, default=16, help="most requests generated together")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long an idle server waits for batch-mates")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    p.set_defaults(func=serve)

    p = subparsers.add_parser("loadtest", help="send concurrent chat requests to a server and report latency",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--requests", type=int, default=64, help="total requests (at most 10000)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default="Tell me about the river.")
    p.add_argument("--stream", action="store_true", help="stream responses (also reports time to first text)")
    p.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds")
    p.add_argument("--allow-remote", action="store_true", help="allow a URL that is not loopback")
    p.set_defaults(func=loadtest)


def serve(args) -> int:
    from pathlib import Path

    import torch
    import uvicorn

    from .. import load
    from ..serve import ServeConfig, create_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(args.model, dtype=args.dtype, device=device)
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "unmask")
    config = ServeConfig(model_name=name, max_tokens_limit=args.max_tokens_limit,
                         default_max_tokens=args.default_max_tokens, block_length=args.block_length,
                         steps=args.steps, cfg_scale=args.cfg_scale, temperature=args.temperature,
                         remasking=args.remasking, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                         batch_window_ms=args.batch_window_ms, timeout_s=args.timeout)
    print(f"unmask serve: model {name!r} on {device}; open http://{args.host}:{args.port}/ for the live view")
    uvicorn.run(create_app(model, tokenizer, config), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=10)
    return 0


def loadtest(args) -> int:
    from ..serve.loadtest import LoadTest, run_loadtest

    report = run_loadtest(LoadTest(url=args.url, concurrency=args.concurrency, requests=args.requests,
                                   max_tokens=args.max_tokens, prompt=args.prompt, stream=args.stream,
                                   duration_s=args.duration, allow_remote=args.allow_remote))
    print(report.format())
    return 0 if report.errors == 0 else 1
