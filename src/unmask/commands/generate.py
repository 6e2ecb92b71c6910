"""`unmask generate` and `unmask chat`: sample from a checkpoint directory (default: the bundled model)."""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="load an unknown architecture with the checkpoint's own modeling code")


def add_sampling_args(p: argparse.ArgumentParser, gen_length: int = 64) -> None:
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    p.add_argument("--gen-length", type=int, default=gen_length, help="tokens to generate (default: %(default)s)")
    p.add_argument("--block-length", type=int, default=None, help="default: gen-length (one block)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised CFG weight w (default: %(default)s, off)")
    p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random", "margin", "entropy"],
                   help="which positions to commit each step (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    fast = p.add_argument_group("fast sampling (opt-in approximations; docs/fast-sampling.md)")
    fast.add_argument("--cache", choices=["prefix", "dual"], default=None, help="approximate KV cache")
    fast.add_argument("--cache-refresh", type=int, default=None,
                      help="also refresh the cache every N steps inside a block (default: at block starts only)")
    fast.add_argument("--threshold", type=float, default=None,
                      help="parallel decoding: commit every position scoring >= this (steps is then unused)")
    fast.add_argument("--factor", type=float, default=None, help="parallel decoding by Fast-dLLM's factor rule")
    fast.add_argument("--reuse-uncond", action="store_true",
                      help="with --cache and --cfg-scale: run the unconditional branch only at cache refreshes")
    fast.add_argument("--cuda-graph", action="store_true", help="with --cache dual on a GPU: replay each step as a CUDA graph")


def sampling_kwargs(args) -> dict:
    import torch

    block = args.block_length or args.gen_length
    return dict(steps=args.steps or args.gen_length, gen_length=args.gen_length, block_length=block,
                temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                generator=torch.Generator(args.device).manual_seed(args.seed), cache=args.cache,
                cache_refresh=args.cache_refresh or "block", threshold=args.threshold, factor=args.factor,
                reuse_uncond=args.reuse_uncond, cuda_graph=args.cuda_graph)


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with masked diffusion")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt text (read from stdin when not given)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    p.add_argument("--show-steps", action="store_true", help="animate the denoising in the terminal")
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=run_chat)


def read_prompt(args) -> str:
    """The prompt argument, else standard input (a pipe or file), else a one-line error."""
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError('no prompt: unmask generate "PROMPT", or pipe one in (echo PROMPT | unmask generate)')
    text = sys.stdin.read().rstrip("\n")
    if not text:
        raise ValueError("the prompt read from stdin is empty")
    return text


def run_generate(args) -> int:
    import unmask
    from unmask.sampling.text import generate_text

    prompt = read_prompt(args)

    model, tokenizer = unmask.load(args.model, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    kwargs = sampling_kwargs(args)
    kwargs["callback"] = (TerminalAnimation(tokenizer, model.config.mask_token_id) if args.show_steps
                          else StepProgress(kwargs["steps"]))
    [text] = generate_text(model, tokenizer, [prompt], chat=args.chat, **kwargs)
    kwargs["callback"].close()
    print(text if args.chat else prompt + text)
    return 0


def run_chat(args) -> int:
    import unmask
    from unmask.sampling.text import generate_text

    model, tokenizer = unmask.load(args.model, dtype=args.dtype, device=args.device,
                                   trust_remote_code=args.trust_remote_code)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("unmask chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            return 0
        if not user:
            return 0
        messages.append({"role": "user", "content": user})
        [reply] = generate_text(model, tokenizer, [messages], **sampling_kwargs(args))
        print(f"model> {reply}")
        messages.append({"role": "assistant", "content": reply})


class StepProgress:
    """A tqdm bar over denoising steps (rate and ETA), on stderr."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", leave=False, file=sys.stderr, disable=None)

    def __call__(self, state) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class TerminalAnimation:
    """Redraws the generated canvas after every step: masks dim, tokens bold as they are committed."""

    DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"

    def __init__(self, tokenizer, mask_id: int, stream=sys.stderr):
        self.tokenizer, self.mask_id, self.stream = tokenizer, mask_id, stream
        self.stream.write("\x1b7")  # remember where the frame starts

    def __call__(self, state) -> None:
        row, fresh = state.x[0, state.prompt_length:], state.committed[0, state.prompt_length:]
        parts = []
        for token, new in zip(row.tolist(), fresh.tolist()):
            if token == self.mask_id:
                parts.append(f"{self.DIM}_{self.RESET}")
            else:
                text = self.tokenizer.decode([token])
                parts.append(f"{self.BOLD}{text}{self.RESET}" if new else text)
        self.stream.write(f"\x1b8\x1b[J[step {state.step + 1}] " + "".join(parts))
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
