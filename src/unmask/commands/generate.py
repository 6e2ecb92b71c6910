"""`unmask generate` and `unmask chat`: sample from a checkpoint directory (default: the bundled model)."""

from __future__ import annotations

import argparse
import sys

from ..sampling.blocks import is_block_checkpoint
from ..sampling.options import CACHE_MODES
from ..sampling.remasking import REMASKING_RULES


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory, or a training run directory (its latest checkpoint); "
                        "default: the bundled model")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16 (or fp32, bf16, fp16); default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="load an unknown architecture with the checkpoint's own modeling code")
    p.add_argument("--quantize", default=None, metavar="int8",
                   help="int8: 8-bit linear weights via torchao (pip install \"unmask[quant]\"; docs/quantize.md)")
    add_adapter_arg(p)


def add_adapter_arg(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--adapter DIR; with `several` (the server) it may be repeated, each as DIR or NAME=DIR."""
    if several:
        p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                       help="a LoRA adapter (or LoRA training run), served under NAME (default: its directory "
                            "name); one is merged into the weights at load; several are held beside one base, "
                            "which is served too, and each request's model field picks one (docs/lora.md); "
                            "without --model, the base model they record")
        return
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter (or LoRA training run) merged into the weights at load (docs/lora.md); "
                        "without --model, the base model it records")


def base_model(args):
    """The base checkpoint: --model, or with --adapter alone the base that adapter records (None: bundled)."""
    from ..models.loading import base_checkpoint

    return base_checkpoint(args.model, args.adapter)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree: shard the model over N processes started with "
                        "torchrun --nproc-per-node N -m unmask ... (eval: any multiple of N, each N processes "
                        "one copy scoring a share of the items; default: %(default)s; docs/distributed.md)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert parallelism for MoE models: split the routed experts whole over the --tp ranks "
                        "(tokens reach them by all-to-all) instead of splitting every expert's width; "
                        "must equal --tp (docs/distributed.md)")


def load_for_args(args, replicas: bool = False):
    """(model, tokenizer) as the model flags ask: placed, quantized, an adapter merged, and with --tp N
    sharded over the torchrun processes (each rank then runs the same command on its shard; with
    `replicas`, eval's, over each group of N of them: `join_tensor_parallel`)."""
    from ..models import load_model, load_tokenizer
    from ..models.parallel import join_tensor_parallel

    device, dtype = model_placement(args)
    path = base_model(args)
    tp = getattr(args, "tp", 1)
    if tp != 1 or getattr(args, "ep", None) is not None:
        check_tensor_parallel(args, path)
    mesh, device = join_tensor_parallel(tp, device, replicas=replicas)
    model = load_model(path, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code,
                       quantize=args.quantize, adapter=args.adapter, mesh=mesh,   # a mesh: each rank reads its slices
                       expert_parallel=expert_parallel(args))
    return model, load_tokenizer(path, trust_remote_code=args.trust_remote_code)


def check_tensor_parallel(args, path=None, also: tuple[str, ...] = (), config=None) -> None:
    """--tp N (and --ep), checked before any weights are read: --ep equal to --tp, the flags they do
    not combine with yet (--trust-remote-code, --quantize, and the entry point's `also`), and a
    model (`config`, else the checkpoint at `path`'s) whose heads, vocabulary and widths (or, with
    --ep, experts) N divides."""
    from ..models import load_config
    from ..models.parallel import check_divisible

    if args.ep is not None and (args.ep != args.tp or args.tp == 1):
        raise ValueError(f"--ep {args.ep} with --tp {args.tp}: expert parallelism splits the experts over the "
                         f"tensor-parallel ranks, so --ep must equal --tp, at least 2 (--tp N --ep N), or be left out")
    for flag in ("--trust-remote-code", "--quantize", *also):
        if getattr(args, flag[2:].replace("-", "_"), None):
            raise ValueError(f"--tp shards unmask's own full-precision models and is not available with "
                             f"{flag} yet: drop one of them")
    if expert_parallel(args) and getattr(args, "cuda_graph", False):
        raise ValueError("--ep reads each MoE layer's expert counts on the host to size its all-to-alls, which a "
                         "CUDA graph cannot capture: drop --cuda-graph or --ep")
    check_divisible(config or load_config(path), args.tp, expert_parallel(args))


def expert_parallel(args) -> bool:
    """Whether --ep asks for the experts split whole over the ranks (checked by `check_tensor_parallel`)."""
    return getattr(args, "ep", None) is not None


def model_placement(args):
    """(device, dtype) from --device/--dtype, checked (with --quantize) before any weights are read."""
    from ..models.placement import resolve_device, resolve_dtype
    from ..models.quantize import check_quantize

    check_quantize(args.quantize)
    return resolve_device(args.device), resolve_dtype(args.dtype)


def add_sampling_args(p: argparse.ArgumentParser, gen_length: int = 64) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: gen-length); for LLaDA2.x models, steps per block (default: 32)")
    p.add_argument("--gen-length", type=int, default=gen_length, help="tokens to generate (default: %(default)s)")
    p.add_argument("--block-length", type=int, default=None,
                   help="default: gen-length (one block); for LLaDA2.x models 32")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: 0)")
    p.add_argument("--cfg-scale", type=float, default=None, help="unsupervised CFG weight w (default: 0, off)")
    p.add_argument("--guidance", default=None, metavar="FORM",
                   help="the form of CFG: a schedule (constant, linear, interval:LO:HI) and/or an unconditional "
                        "canvas (prompt, span:START:STOP, acfg:RATIO), and 'norm' to keep the unguided unmasking rate, "
                        "e.g. 'linear,span:0:-4' or 'linear,norm' (docs/guidance.md)")
    p.add_argument("--remasking", default=None, choices=list(REMASKING_RULES),
                   help="which positions to commit each step (default: low_confidence)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    fast = p.add_argument_group("fast sampling (opt-in approximations; docs/fast-sampling.md)")
    fast.add_argument("--cache", choices=list(CACHE_MODES), default=None, help="approximate KV cache")
    fast.add_argument("--cache-refresh", type=int, default=None,
                      help="also refresh the cache every N steps inside a block (default: at block starts only)")
    fast.add_argument("--threshold", type=float, default=None,
                      help="parallel decoding: commit every position scoring >= this (steps is then unused); "
                           "for LLaDA2.x models the public threshold rule (default: 0.95)")
    fast.add_argument("--factor", type=float, default=None, help="parallel decoding by Fast-dLLM's factor rule")
    fast.add_argument("--reuse-uncond", action="store_true",
                      help="with --cache and --cfg-scale: run the unconditional branch only at cache refreshes "
                           "(LLaDA2.x: once per block)")
    fast.add_argument("--cuda-graph", action="store_true", help="with --cache dual on a GPU: replay each step as a CUDA graph")
    block = p.add_argument_group("block diffusion (LLaDA2.x models only; docs/block-diffusion.md)")
    block.add_argument("--minimal-topk", type=int, default=None, help="caps steps at gen-length / this (default: 1)")
    block.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (temperature > 0)")
    block.add_argument("--top-p", type=float, default=None, help="sample within this probability mass (temperature > 0)")
    block.add_argument("--no-eos-early-stop", dest="eos_early_stop", action="store_false",
                       help="finish the block that holds the EOS instead of stopping once the text before it is "
                            "decoded (the text is the same; early stop only saves steps)")


def sampling_options(args, block_diffusion: bool = False):
    """The sampler's options from the flags, checked before any model is loaded. Unset flags take
    the family's documented defaults; a value given is never replaced, and a flag of the other
    family is an error."""
    from ..sampling import check_seed
    from ..sampling.options import options_for

    check_seed(args.seed)
    given = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                 temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking, cache=args.cache,
                 cache_refresh=args.cache_refresh, threshold=args.threshold, factor=args.factor,
                 reuse_uncond=args.reuse_uncond or None, cuda_graph=args.cuda_graph or None,
                 minimal_topk=args.minimal_topk, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance)
    if not block_diffusion:   # the CLI's defaults: one step per token, one block
        given["steps"] = args.gen_length if args.steps is None else args.steps
        given["block_length"] = args.gen_length if args.block_length is None else args.block_length
    return options_for(block_diffusion, device=args.device, **given)


def sampling_kwargs(options, args, block_diffusion: bool = False) -> dict:
    """Sampler keyword arguments: the options, a generator seeded from --seed, and for LLaDA2.x
    models the EOS early stop."""
    import torch

    kwargs = dict(options.kwargs(), generator=torch.Generator(args.device).manual_seed(args.seed))
    if block_diffusion:
        kwargs["eos_early_stop"] = args.eos_early_stop
    return kwargs


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with masked diffusion")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt text, where \\n is a line break (read from stdin, verbatim, when not given)")
    add_model_args(p)
    add_parallel_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template")
    p.add_argument("--show-steps", action="store_true", help="animate the denoising in the terminal")
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal")
    add_model_args(c)
    add_parallel_args(c)   # under torchrun rank 0 reads the turns and sends each to the other ranks
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=run_chat)


def read_prompt(args) -> str:
    """The prompt argument, else standard input (a pipe or file), else a one-line error.

    In the argument the two characters \\n are a line break: "Question: ...\\nAnswer:" is how
    people write a QA prompt in a shell, where double quotes keep the backslash."""
    if args.prompt is not None:
        return args.prompt.replace("\\n", "\n")
    if getattr(args, "tp", 1) != 1:
        raise ValueError("torchrun does not pass standard input to its processes: with --tp give the prompt as an "
                         "argument")
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError('no prompt: unmask generate "PROMPT", or pipe one in (echo PROMPT | unmask generate)')
    text = sys.stdin.read().rstrip("\n")
    if not text:
        raise ValueError("the prompt read from stdin is empty")
    return text


def run_generate(args) -> int:
    from unmask.models.parallel import is_first_rank
    from unmask.sampling.text import generate_text

    prompt = read_prompt(args)
    path = base_model(args)
    block = is_block_checkpoint(path)
    options = sampling_options(args, block)
    model, tokenizer = load_for_args(args)
    kwargs = sampling_kwargs(options, args, block)
    steps = None if block or options.parallel else options.steps   # parallel decoding: as many as it takes
    speaks = is_first_rank()   # under torchrun every rank generates the same text; rank 0 shows it
    kwargs["callback"] = (TerminalAnimation(tokenizer, model.config.mask_token_id) if args.show_steps and speaks
                          else StepProgress(steps, enabled=speaks))
    [text] = generate_text(model, tokenizer, [prompt], chat=args.chat, **kwargs)
    kwargs["callback"].close()
    if speaks:
        print(text if args.chat else prompt + text)
    return 0


def run_chat(args) -> int:
    """The chat loop. Under torchrun with --tp N every rank runs every turn on its shard; rank 0
    alone reads the terminal (torchrun hands all ranks the same standard input, which they would
    race for) and prints, and sends each line, or the end, to the others (`next_turn`)."""
    from unmask.models.parallel import is_first_rank
    from unmask.sampling.text import generate_text

    path = base_model(args)
    block = is_block_checkpoint(path)
    options = sampling_options(args, block)
    model, tokenizer = load_for_args(args)
    turns = turn_group(args.tp)
    speaks = is_first_rank()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if speaks:
        print("unmask chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        user = next_turn(turns, speaks)
        if not user:
            return 0
        messages.append({"role": "user", "content": user})
        [reply] = generate_text(model, tokenizer, [messages], **sampling_kwargs(options, args, block))
        if speaks:
            print(f"model> {reply}", flush=True)
        messages.append({"role": "assistant", "content": reply})


def turn_group(tp: int):
    """The group chat turns are sent on under --tp (no timeout: a person may take long to type);
    None for one process."""
    if tp == 1:
        return None
    from ..serve.tensor_parallel import announcement_group

    return announcement_group()


def next_turn(group, speaks: bool) -> str:
    """The user's next line ('' at the end of input): read by the rank that speaks, sent to the
    others on `group` when there are others."""
    line = None
    if speaks:
        try:
            line = input("you> ").strip()
        except EOFError:
            line = ""
    if group is None:
        return line
    import torch.distributed as dist

    box = [line]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class StepProgress:
    """A tqdm bar over denoising steps (rate and ETA), on stderr."""

    def __init__(self, total: int | None, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", leave=False, file=sys.stderr, disable=None if enabled else True)

    def __call__(self, state) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class TerminalAnimation:
    """Redraws the generated canvas after every step: masks dim, tokens bold as they are committed."""

    DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"

    def __init__(self, tokenizer, mask_id: int, stream=None):
        self.tokenizer, self.mask_id, self.stream = tokenizer, mask_id, stream or sys.stderr
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
