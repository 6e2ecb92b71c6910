"""The row stepper against `generate` on the same fixed batch: what continuous batching's per-row
state costs where no request comes or goes, in one run.

`unmask serve` steps every request as a `Row` of its own (`unmask.sampling.rows`), so a request can
join or leave at any step; `generate` runs a fixed batch as one tensor (one window, one cache for
all rows, one decision per step). Both give each row the same tokens (tests/test_rows.py). This
script times both on the same prompts and options, so the price of per-row state is a measured
ratio, not a guess: it is why `generate` is not rewritten as a loop over rows.

    python scripts/rows_vs_generate.py [--model DIR] [--batch 1 8] [--modes exact dual "dual+cfg"]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import unmask
from unmask.bench import mode_options, random_prompts, timed
from unmask.sampling.rows import Row, step


def run_rows(model, prompt: torch.Tensor, options) -> torch.Tensor:
    """The batch stepped as rows until every row is done; returns the canvases stacked."""
    rows = [Row.start(p, options, mask_id=model.config.mask_token_id) for p in prompt.tolist()]
    while not all(r.done for r in rows):
        step(model, rows)
    return torch.stack([r.x for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=["exact", "dual", "dual+cfg"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="time both paths this many times, interleaved")
    args = p.parse_args()
    model, _ = unmask.load(args.model)
    schedule = dict(steps=args.gen_length, gen_length=args.gen_length, block_length=args.block_length)
    print(f"prompt {args.prompt_len}, gen {args.gen_length}, block {args.block_length}, one token per step, "
          f"median of {args.rounds} rounds of {args.repeats} calls\n")
    print("| batch | mode | generate s | rows s | rows / generate | same tokens |\n|---|---|---|---|---|---|")
    for batch in args.batch:
        prompt = random_prompts(model.config, batch, args.prompt_len, 0, model.device)
        for mode in args.modes:
            options = mode_options(mode, 1.0, schedule).check()
            fixed = lambda: unmask.generate(model, prompt, **options.kwargs())
            stepped = lambda: run_rows(model, prompt, options)
            times = {"generate": [], "rows": []}
            for _ in range(args.rounds):
                times["generate"].append(timed(fixed, args.repeats, model.device)[1])
                times["rows"].append(timed(stepped, args.repeats, model.device)[1])
            g, r = (statistics.median(times[k]) for k in ("generate", "rows"))
            same = torch.equal(fixed(), stepped())
            print(f"| {batch} | {mode} | {g:.3f} | {r:.3f} | {r / g:.2f}× | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
