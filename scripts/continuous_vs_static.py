"""Continuous batching against the policy before it, on the same trace, in one process run (issue 21).

Two servers, one after the other, each in a child process of its own (so the load generator in this
process does not share a GIL with it), loaded by `unmask loadtest`'s open-loop mode with the same
trace (Poisson arrivals, mixed max_tokens, temperature and cfg_scale):
- static: the old batcher's policy (`EqualOptionsScheduler`, defined here): rows start only when
  nothing runs, and only requests with equal options start together;
- continuous: the server as shipped (requests join the running rows at the next step).
The old batcher itself is gone from unmask; this script keeps its admission policy only to measure
against it, running through the same row stepper.
Prints every run's report and the ratios continuous / static over all runs of each (`--repeats N`
runs each policy N times, in alternating order, so a drift in a shared machine's load hits both):
throughput (target >= 1.5), p95 latency (target <= 0.7), and the 5xx count (target 0).

    python3 scripts/continuous_vs_static.py --rate 6 --requests 60 --repeats 2
    python3 scripts/continuous_vs_static.py --trace trace.jsonl --rate 4
    python3 scripts/continuous_vs_static.py --shape llada2-small --rate 4 --requests 40 --repeats 2   # LLaDA2.x

`--shape` serves a random-weight model of an `unmask bench` shape with the bundled tokenizer (as
scripts/serve_speed.py does): its text is noise, but its steps cost what a trained model's do, and
`llada2-small` is the block-diffusion (LLaDA2.x layout, MoE) model the size of the bundled one.

The servers take PyTorch's default threads (all cores); set OMP_NUM_THREADS to change that. The
table in docs/serve.md was measured with the first command on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import multiprocessing

from unmask.bench import SHAPES
from unmask.serve.batching import Job, Scheduler
from unmask.serve.loadtest import LoadTest, Report, mixed_trace, percentile, read_trace, run_open_loop


class EqualOptionsScheduler(Scheduler):
    """The admission policy before continuous batching: waiting requests start only when no row
    runs, and only those with the head's options (oldest first, within the row and token bounds)."""

    def _admit(self) -> list[Job]:
        if self.rows or not self.pending:
            return []
        key, rows, tokens, admitted = self.pending[0].key, 0, 0, []
        for job in self.pending:
            if rows >= self.max_batch_size or not self.runner.steps(job):
                break
            over_budget = self.max_batch_tokens is not None and tokens + job.tokens > self.max_batch_tokens and rows
            if job.key != key or over_budget:
                continue
            admitted.append(job)
            rows, tokens = rows + 1, tokens + job.tokens
        return self._take(admitted)


def serve(model_dir: str | None, shape: str | None, config, continuous: bool, urls, stop) -> None:
    """The child process: load the model, serve it on a free loopback port, report the URL, wait."""
    import unmask
    import unmask.serve.app
    from unmask.bench import SHAPES, random_model
    from unmask.models.loading import load_tokenizer
    from unmask.serve import create_app
    from unmask.serve.lifecycle import serve_in_thread

    if not continuous:  # this child process only: the app builds its scheduler from this name
        unmask.serve.app.Scheduler = EqualOptionsScheduler

    if shape is not None:
        model, tokenizer = random_model(SHAPES[shape]), load_tokenizer(None)
    else:
        model, tokenizer = unmask.load(model_dir) if model_dir else unmask.load()
    with serve_in_thread(create_app(model, tokenizer, config)) as url:
        urls.put(url)
        stop.wait()


def served(model_dir: str | None, shape: str | None, trace: list[dict], continuous: bool,
           max_batch_size: int) -> Report:
    from unmask.serve import ServeConfig

    config = ServeConfig(model_name="bench", max_batch_size=max_batch_size,
                         max_tokens_limit=max(e.get("max_tokens", 64) for e in trace))
    spawn = multiprocessing.get_context("spawn")
    urls, stop = spawn.Queue(), spawn.Event()
    child = spawn.Process(target=serve, args=(model_dir, shape, config, continuous, urls, stop))
    child.start()
    try:
        return run_open_loop(LoadTest(url=urls.get(timeout=300)), trace)
    finally:
        stop.set()
        child.join(timeout=60)


def server_errors(report: Report) -> int:
    return sum(n for kind, n in report.error_kinds.items() if kind.startswith("HTTP 5"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    model.add_argument("--shape", choices=list(SHAPES), default=None,
                       help="a random-weight model of this bench shape, with the bundled tokenizer")
    p.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    p.add_argument("--requests", type=int, default=60, help="requests of the mixed preset")
    p.add_argument("--trace", default=None, help="a trace file instead of the mixed preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="runs of each policy, in alternating order")
    args = p.parse_args()

    trace = read_trace(args.trace, args.rate, args.seed) if args.trace else mixed_trace(args.requests, args.rate,
                                                                                         args.seed)
    policies = {"static": False, "continuous": True}
    reports: dict[str, list[Report]] = {name: [] for name in policies}
    for r in range(args.repeats):   # alternating order (S C, C S, ...): a drift in the machine's load hits both
        for name in (list(policies) if r % 2 == 0 else list(policies)[::-1]):
            report = served(args.model, args.shape, trace, policies[name], args.max_batch_size)
            reports[name].append(report)
            print(f"## {name} (run {r + 1}){' (equal options, admit when idle)' if name == 'static' else ''}\n"
                  f"{report.format()}\n")
    static, continuous = (merged(reports[name]) for name in policies)
    throughput = (continuous.completion_tokens / continuous.wall_s) / (static.completion_tokens / static.wall_s)
    p95 = percentile(continuous.latencies, 95) / percentile(static.latencies, 95)
    ttft = percentile(continuous.first_text, 50) / percentile(static.first_text, 50)
    print(f"ratios continuous / static over {args.repeats} x {len(trace)} requests at {args.rate:g}/s: "
          f"throughput {throughput:.2f}x (target >= 1.5), p95 latency {p95:.2f}x (target <= 0.7), "
          f"p50 time to first text {ttft:.2f}x; 5xx: static {server_errors(static)}, "
          f"continuous {server_errors(continuous)}")


def merged(reports: list[Report]) -> Report:
    """The runs of one policy as one report: counts and wall times add, latencies pool."""
    out = Report()
    for r in reports:
        out.sent, out.ok, out.errors = out.sent + r.sent, out.ok + r.ok, out.errors + r.errors
        out.error_kinds += r.error_kinds
        out.latencies += r.latencies
        out.first_text += r.first_text
        out.completion_tokens += r.completion_tokens
        out.wall_s += r.wall_s
    return out

if __name__ == "__main__":
    main()
