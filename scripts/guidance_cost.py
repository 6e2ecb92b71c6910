"""What each form of guidance costs, as a ratio to the same sampler without guidance, in one run.

For every form: the dual cache with guidance and with reuse_uncond against the dual cache without
guidance, and (for forms that cannot use a cache, A-CFG) the uncached sampler against the uncached
sampler without guidance. Same random prompts and schedule as `unmask bench` (`mode_options`,
`timed`: median of --repeats), on the bundled model by default. Every cell, the baselines included,
is timed once per round and the table gives each cell's median over --rounds, so a slow spell of a
shared machine moves a form and its baseline together.

Usage: python scripts/guidance_cost.py [--model DIR] [--batch 8] [--gen-length 64] [--repeats 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import unmask
from unmask.bench import mode_options, random_prompts, timed

FORMS = ("constant", "linear", "interval:0.5:1", "span:2:-3", "acfg:0.5")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="measure every cell this many times, interleaved")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    args = p.parse_args()
    model, _ = unmask.load(args.model)
    schedule = dict(steps=args.gen_length, gen_length=args.gen_length, block_length=args.block_length)
    prompt = random_prompts(model.config, args.batch, args.prompt_len, 0, model.device)

    def seconds(mode: str, form: str) -> float:
        options = mode_options(mode, args.cfg_scale, schedule, guidance=form).check()
        return timed(lambda: unmask.generate(model, prompt, **options.kwargs()), args.repeats, model.device)[1]

    cells = [("none", "dual"), ("none", "exact")] + [
        (form, mode) for form in FORMS for mode in (["exact+cfg"] if form.startswith("acfg") else ["dual+cfg", "dual+cfg reuse"])]
    rounds: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    for _ in range(args.rounds):   # every cell once per round, so a slow spell of the machine hits all of them
        for form, mode in cells:
            rounds[form, mode].append(seconds(mode, "constant" if form == "none" else form))
    median = {cell: statistics.median(times) for cell, times in rounds.items()}
    print(f"batch {args.batch}, prompt {args.prompt_len}, gen {args.gen_length}, block {args.block_length}, "
          f"w {args.cfg_scale:g}, median of {args.rounds} rounds; no guidance: dual {median['none', 'dual']:.3f} s, "
          f"exact {median['none', 'exact']:.3f} s\n")
    print("| form | mode | seconds | × no guidance (same mode) |\n|---|---|---|---|")
    for form, mode in cells[2:]:
        s = median[form, mode]
        print(f"| {form} | {mode} | {s:.3f} | {s / median['none', mode.split('+')[0]]:.2f}× |")

if __name__ == "__main__":
    main()
