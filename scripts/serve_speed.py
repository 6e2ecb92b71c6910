"""Served tokens/s next to the sampler's own: same model, same options, one process (issue 13, item 3).

A random-weight model of a bench shape (no checkpoint, no download) is timed twice:
- bench: `generate` with the server's default options (dual cache, CUDA graphs, one token per step)
  at batch 1 and 8, as `unmask bench` times it (one warm-up call, then one timed call);
- served: the same model behind `create_app` with cuda_graph on (what `unmask serve --cuda-graph`
  runs once its checkpoint is loaded), loaded by `unmask.serve.loadtest` at each concurrency:
  one uncounted round of requests (it captures the graphs of new batch shapes), then the timed ones.
The issue's target is served tokens/s at concurrency 8 >= 80 % of the bench's at batch 8.

The tokenizer is the bundled one, whatever the shape: the server only needs prompt ids inside the
model's vocabulary and takes the mask and EOS ids from the model's config; generated ids the
tokenizer does not know decode to no text but still count as completion tokens, which is what
throughput counts (decoding is then cheaper than with the model's own tokenizer). The prompt is
chat text that encodes to at most --prompt-len tokens, padded by the server to the bench's width.

    python3 scripts/serve_speed.py --shape llada-8b --json OUT/serve.json --markdown OUT/serve.md   # a GPU
    python3 scripts/serve_speed.py --shape bundled --device cpu --dtype float32 --gen-length 32 \\
        --concurrency 1 2 --bench-batches 1 2                                                         # smoke run
"""

from __future__ import annotations

import argparse
import json

import torch

from unmask.bench import SHAPES, hardware, random_model, random_prompts, timed
from unmask.models.loading import load_tokenizer
from unmask.sampling import generate
from unmask.serve import ServeConfig, create_app
from unmask.serve.lifecycle import serve_in_thread
from unmask.serve.loadtest import LoadTest, run_levels

WORDS = "Tell me about the river that runs north past the old mill and the bridge where Mira lives".split()


def chat_prompt(server, tokens: int) -> tuple[str, int]:
    """The longest text of WORDS (repeated) whose chat-formatted prompt is at most `tokens` long."""
    text, length = "", 0
    for i in range(10 * tokens):
        longer = " ".join(WORDS[j % len(WORDS)] for j in range(i + 1))
        n = len(server.prompts.chat([{"role": "user", "content": longer}]))
        if n > tokens:
            break
        text, length = longer, n
    if not text:
        raise ValueError(f"--prompt-len {tokens} is shorter than the chat template alone")
    return text, length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="llada-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--bench-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=2, help="timed requests per level: rounds x concurrency")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()

    cfg = SHAPES[args.shape]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = random_model(cfg, device, dtype)
    tokenizer = load_tokenizer(None)
    if len(tokenizer) > cfg.vocab_size:
        raise SystemExit(f"the bundled tokenizer ({len(tokenizer)} ids) does not fit shape {args.shape} "
                         f"(vocabulary {cfg.vocab_size})")
    config = ServeConfig(model_name=args.shape, cuda_graph=True, max_tokens_limit=args.gen_length,
                         default_max_tokens=args.gen_length, block_length=args.block_length,
                         max_batch_size=max(args.concurrency), max_queue=4 * max(args.concurrency))
    app = create_app(model, tokenizer, config)
    server = app.state.server
    options = config.options(args.gen_length)   # what a request that sets nothing runs
    text, prompt_tokens = chat_prompt(server, args.prompt_len)
    width = server.runner.shapes.width(prompt_tokens)
    print(f"{args.shape}: {model.num_parameters() / 1e9:.2f}B parameters, {dtype} on {device}; {options}; "
          f"served prompt {prompt_tokens} tokens (padded to {width})", flush=True)

    meta = {"shape": args.shape, "parameters": model.num_parameters(), "dtype": args.dtype, "device": str(device),
            "prompt_tokens": prompt_tokens, "prompt_width": width, "gen_length": args.gen_length,
            "options": options.kwargs(), "rounds": args.rounds, "hardware": hardware()}
    bench, served = [], []

    def write() -> None:
        """Write what is measured so far (a stage cut off by its time limit keeps its first rows)."""
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "bench": bench, "served": served}, f, indent=2)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(to_markdown(meta, bench, served))

    for batch in args.bench_batches:
        prompt = random_prompts(cfg, batch, width, seed=0, device=device)
        _, seconds = timed(lambda p=prompt: generate(model, p, mask_id=cfg.mask_token_id, **options.kwargs()), 1,
                           device)
        bench.append({"batch": batch, "seconds": seconds, "tokens_per_s": batch * args.gen_length / seconds})
        print(f"bench batch {batch}: {bench[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
        write()

    batches, run = [], server.runner.run   # requests per batch the server ran (warm-up rounds included)

    def counted(jobs):
        batches.append(len(jobs))
        run(jobs)

    server.runner.run = counted
    with serve_in_thread(app) as url:
        for c in args.concurrency:
            batches.clear()
            [r] = run_levels(LoadTest(url=url, requests=args.rounds * c, max_tokens=args.gen_length, prompt=text,
                                      warmup=c, duration_s=600), [c])
            served.append({"concurrency": c, "ok": r.ok, "errors": r.errors, "seconds": r.wall_s,
                           "completion_tokens": r.completion_tokens,
                           "tokens_per_s": r.completion_tokens / r.wall_s if r.wall_s else 0.0,
                           "mean_batch": sum(batches) / max(len(batches), 1)})
            print(f"served concurrency {c}: {served[-1]['tokens_per_s']:.1f} tokens/s ({r.ok} ok, {r.errors} errors, "
                  f"mean batch {served[-1]['mean_batch']:.1f})", flush=True)
            write()
    print(to_markdown(meta, bench, served))


def to_markdown(meta: dict, bench: list[dict], served: list[dict]) -> str:
    base = next((b["tokens_per_s"] for b in bench if b["batch"] == 8), None)

    def row(what: str, rows: str, tokens_per_s: float) -> str:
        return f"| {what} | {rows} | {tokens_per_s:.1f} | {f'{tokens_per_s / base:.2f}' if base else '–'} |"

    hw = ", ".join(f"{k}: {v}" for k, v in meta["hardware"].items())
    lines = [f"Served vs bench, {meta['shape']} ({meta['parameters'] / 1e9:.2f}B, {meta['dtype']}), prompt "
             f"{meta['prompt_tokens']} tokens (width {meta['prompt_width']}), gen {meta['gen_length']}, "
             "dual cache + CUDA graph, one token per step", "", f"hardware: {hw}", "",
             "| what | rows | tokens/s | / bench batch 8 |", "|---|---|---|---|"]
    lines += [row("bench (`generate`)", f"batch {b['batch']}", b["tokens_per_s"]) for b in bench]
    lines += [row("served (`loadtest`)", f"concurrency {s['concurrency']} (mean batch {s['mean_batch']:.1f}"
                  + (f", {s['errors']} errors)" if s["errors"] else ")"), s["tokens_per_s"]) for s in served]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
