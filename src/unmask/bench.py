"""`unmask bench`: the sampler's modes against a plain reference, same model and prompts, one process.

The baseline is `reference_generate`, LLaDA's public `generate` written as the public code is
shaped: the whole canvas through the model at every step, softmax over every position, a Python
loop over rows to pick the top-k. Then unmask's modes (exact, CFG, caches, parallel decoding) run on the same
prompts. Per mode the table gives tokens/s, forward passes per generated token, speedup over the
baseline and token agreement with unmask's exact output under the same guidance (1.0 means
identical; the exact modes must show 1.0, the approximate ones show what they change).

Block-diffusion models (LLaDA2.x) have their own modes (`BLOCK_MODES`): the baseline is the public
LLaDA2 algorithm as the public code runs it (the whole window through the model at every step,
no cache), and the modes add unmask's exact cache of finished blocks and CFG; the exact cache
must show agreement 1.0.

Without a checkpoint the model is a named shape with random weights (no download): throughput is
meaningful, agreement much less so (a random model is unconfident, so threshold decoding commits
about one token per step and the cache approximation flips near-ties).

With `suite_items` (and the checkpoint's tokenizer) each mode also gets a suite accuracy: agreement
says how far a fast mode strays from the exact output, not whether what it writes is still right.
Likelihood scoring does not depend on the sampling mode, so the accuracy is measured by generation:
each mode completes the first items of know_lambada and know_arc, and an item counts when the
completion's first word is the answer.

With quantized weights (`unmask bench --quantize int8`) every mode runs on the quantized model, and
before the timings `quantization_error` compares it with the same weights unquantized: logit error
and token agreement at temperature 0. Compare tokens/s with a run without --quantize.
"""

from __future__ import annotations

import json
import platform
import statistics
import string
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .eval.encoding import encode_pair
from .eval.tasks import get_task, load_items
from .models import PRESETS, MaskedDiffusionLM, ModelConfig, weight_bytes
from .sampling import block_generate, generate, is_block_diffusion
from .sampling.options import BlockOptions, SamplerOptions, context_length
from .sampling.text import complete_ids

# Random-weight shapes: the public ones, unmask's bundled model, and a tiny one for CI.
SHAPES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "bundled": ModelConfig(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, mlp_hidden_size=704,
                           max_seq_len=256, mask_token_id=1, eos_token_id=0, eot_token_id=5, pad_token_id=0),
    "llada2-tiny": ModelConfig(layout="llada2_moe", vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                               mlp_hidden_size=128, max_seq_len=1024, rope_theta=600000.0, norm_eps=1e-6, qk_norm=True,
                               partial_rotary_factor=0.5, router="sigmoid", n_experts=16, experts_per_token=4,
                               expert_hidden_size=32, n_groups=4, topk_groups=2, routed_scale=2.5, norm_topk_prob=True,
                               expert_bias=True, shared_expert_hidden_size=32, moe_layers=[False, True, True],
                               mask_token_id=511, eos_token_id=509, pad_token_id=510),
    # the bundled model's size (and its tokenizer's ids) in the block-diffusion layout: serving measurements
    "llada2-small": ModelConfig(layout="llada2_moe", vocab_size=2048, d_model=128, n_layers=4, n_heads=4,
                                n_kv_heads=2, mlp_hidden_size=352, max_seq_len=512, rope_theta=600000.0,
                                norm_eps=1e-6, qk_norm=True, partial_rotary_factor=0.5, router="sigmoid",
                                n_experts=8, experts_per_token=2, expert_hidden_size=64, n_groups=2, topk_groups=1,
                                routed_scale=2.5, norm_topk_prob=True, expert_bias=True,
                                shared_expert_hidden_size=64, moe_layers=[False, True, True, True],
                                mask_token_id=1, eos_token_id=0, eot_token_id=5, pad_token_id=0),
    **PRESETS,
}

# Mode name -> generate() options; cfg modes take the bench's cfg_scale, "tokens_per_step" divides the
# steps. Graph modes need a GPU (`default_modes`).
MODES: dict[str, dict] = {
    "exact": {},
    "exact+cfg": {"cfg": True},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "dual+cfg": {"cache": "dual", "cfg": True},
    "dual+cfg reuse": {"cache": "dual", "cfg": True, "reuse_uncond": True},
    "dual 2/step": {"cache": "dual", "tokens_per_step": 2},
    "dual 4/step": {"cache": "dual", "tokens_per_step": 4},
    "threshold 0.9": {"threshold": 0.9},
    "threshold 0.7": {"threshold": 0.7},
    "threshold 0.5": {"threshold": 0.5},
    "threshold+dual+cfg": {"threshold": 0.9, "cache": "dual", "cfg": True},
    "dual+graph": {"cache": "dual", "cuda_graph": True},
    "dual+cfg+graph": {"cache": "dual", "cfg": True, "cuda_graph": True},
    "dual+cfg reuse+graph": {"cache": "dual", "cfg": True, "reuse_uncond": True, "cuda_graph": True},
    "dual+graph 4/step": {"cache": "dual", "tokens_per_step": 4, "cuda_graph": True},
    "threshold+dual+cfg+graph": {"threshold": 0.9, "cache": "dual", "cfg": True, "cuda_graph": True},
    "dual+graph+compile": {"cache": "dual", "cuda_graph": True, "compile": True},
}


# Block-diffusion (LLaDA2.x) modes over the baseline `block_generate(cache=False)`; `steps` is per block.
BLOCK_MODES: dict[str, dict] = {
    "block cache": {},
    "block cache+cfg": {"cfg": True},
    "block cache+cfg reuse": {"cfg": True, "reuse_uncond": True},
}


def default_modes(device: str | torch.device, block_diffusion: bool = False) -> list[str]:
    """Every mode of the family; on a CPU the graph modes are left out (a graph needs CUDA to capture)."""
    if block_diffusion:
        return list(BLOCK_MODES)
    return [m for m in MODES if torch.device(device).type == "cuda" or not MODES[m].get("cuda_graph")]


# The suite's generation tasks and schedule: an answer is one word, so a short canvas decoded one
# token per step (exact modes) holds it; the fast modes add their own options to this schedule.
SUITE_TASKS = ("know_lambada", "know_arc")
SUITE_SCHEDULE = {"steps": 8, "gen_length": 8, "block_length": 8}


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 64
    gen_length: int = 256
    block_length: int = 32
    steps: int | None = None        # None: one token per step (gen_length; per block: block_length)
    cfg_scale: float = 1.0
    guidance: str = "constant,prompt"   # the form of CFG of the +cfg modes (docs/guidance.md)
    repeats: int = 3
    modes: list[str] = field(default_factory=lambda: default_modes("cpu"))
    seed: int = 0
    agreement: bool = True          # also run the exact modes' outputs to compare tokens with
    suite_items: int = 0            # items per suite task for the accuracy column; 0: no suite

    @property
    def total_steps(self) -> int:
        return self.gen_length if self.steps is None else self.steps

    def schedule(self, block_diffusion: bool = False) -> dict:
        """steps, gen_length, block_length of the family (block diffusion: steps per block)."""
        if block_diffusion:
            return dict(steps=self.block_length if self.steps is None else self.steps, gen_length=self.gen_length,
                        block_length=self.block_length)
        return dict(steps=self.total_steps, gen_length=self.gen_length, block_length=self.block_length)

    def check(self, device: str | torch.device, block_diffusion: bool = False) -> BenchConfig:
        """Refuse sizes that cannot run and modes the device cannot run, before any model is built."""
        for name, values in (("batch sizes", self.batch_sizes), ("prompt length", [self.prompt_len]),
                             ("repeats", [self.repeats])):
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} must be >= 1 (got {values})")
        if self.suite_items < 0:
            raise ValueError(f"suite items must be >= 0 (got {self.suite_items})")
        family = BLOCK_MODES if block_diffusion else MODES
        for name in self.modes:
            if name not in family:
                kind = "block-diffusion (LLaDA2.x)" if block_diffusion else "LLaDA"
                raise ValueError(f"mode {name!r} is not a mode of {kind} models: choose from {', '.join(family)}")
            try:
                mode_options(name, self.cfg_scale, self.schedule(block_diffusion), block_diffusion,
                             self.guidance).check(device=device)
            except ValueError as e:
                raise ValueError(f"mode {name!r}: {e}") from None
        return self


@torch.no_grad()
def reference_generate(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                       block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
                       remasking: str = "low_confidence", mask_id: int = 126336) -> torch.Tensor:
    """LLaDA's public `generate` as the public code is shaped, deliberately plain: the speed baseline.

    Whole canvas every step, softmax over every position, a Python loop over rows for top-k.
    The public code has no decoding on vocabulary shards: on a tensor-parallel model it gathers
    the full logits every step.
    """
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for block in range(num_blocks):
        block_end = P + (block + 1) * block_length
        block_masked = x[:, block_end - block_length:block_end] == mask_id
        n = block_masked.sum(1, keepdim=True)
        counts = n // per_block + (torch.arange(per_block, device=x.device) < n % per_block).long()
        for i in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                cond, uncond = _full(model(torch.cat([x, un_x])).logits).chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = _full(model(x).logits)
            if temperature > 0:
                noise = (-torch.log(torch.rand(logits.shape, dtype=torch.float64, device=x.device))) ** temperature
                x0 = (logits.double().exp() / noise).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, device=x.device)
            x0_p[:, block_end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, float("-inf"))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(B):
                _, picked = torch.topk(confidence[row], k=int(counts[row, i]))
                transfer[row, picked] = True
            x[transfer] = x0[transfer]
    return x


def _full(logits: torch.Tensor) -> torch.Tensor:
    """The whole logits: gathered from the ranks' vocabulary shards under tensor parallelism."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def random_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> MaskedDiffusionLM:
    """A model of shape `cfg` with N(0, 0.02) matrices, built straight on `device` in `dtype`.

    Built on the meta device first, so an 8B shape never exists in float32 or on the CPU.
    """
    with torch.device("meta"):
        model = MaskedDiffusionLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dim() >= 2:
                t.normal_(0.0, 0.02)
            else:  # norm weights 1, biases 0
                t.fill_(1.0 if name.endswith("weight") else 0.0)
    return model.eval()


def random_prompts(cfg: ModelConfig, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """Random token ids, never the mask id (a mask would be an infilling position)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size - 1, (batch, length), generator=g)
    return (ids + (ids >= cfg.mask_token_id).long()).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device):
    """(result, median seconds) of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return result, statistics.median(times)


def mode_options(name: str, cfg_scale: float, schedule: dict, block_diffusion: bool = False,
                 guidance: str = "constant,prompt") -> SamplerOptions | BlockOptions:
    """The sampler options of mode `name` on top of `schedule` (steps, gen_length, block_length);
    the +cfg modes guide with `cfg_scale` in the form `guidance`."""
    options = dict((BLOCK_MODES if block_diffusion else MODES)[name])
    steps = schedule["steps"] // options.pop("tokens_per_step", 1)
    guided = options.pop("cfg", False)
    values = schedule | {"steps": steps} | options | {"cfg_scale": cfg_scale if guided else 0.0, "guidance": guidance}
    return (BlockOptions if block_diffusion else SamplerOptions)(**values)


def first_word(text: str) -> str:
    """The first whitespace-separated word, without surrounding punctuation."""
    words = text.split()
    return words[0].strip(string.punctuation) if words else ""


def answer_matches(generated: str, target: str) -> bool:
    """Whether a completion gives the answer: its first word is the target, case aside.

    The first word only, because a short canvas runs on past the answer ("orange. Sam Price ...").
    """
    return first_word(generated).lower() == target.strip().lower()


def suite_requests(tokenizer, task_name: str, limit: int,
                   max_prompt: int | None) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, answers) of a task's first `limit` items.

    The prompt is the right choice's context and the answer its continuation, as the likelihood
    eval builds them (lm-eval's formats, BOS in front, the context cut from the left to fit).
    """
    items = load_items(get_task(task_name), limit=limit)
    prompts = [encode_pair(tokenizer, item.requests[item.gold][0], "", max_prompt)[0] for item in items]
    return prompts, [item.requests[item.gold][1].strip() for item in items]


def complete(model, tokenizer, prompts: list[list[int]], batch_size: int, **kwargs) -> tuple[list[str], int]:
    """(completion texts, forward passes) of `prompts`, `batch_size` rows at a time."""
    texts, passes = [], 0
    for start in range(0, len(prompts), batch_size):
        batch_texts, batch_passes = complete_ids(model, tokenizer, prompts[start:start + batch_size], **kwargs)
        texts += batch_texts
        passes += batch_passes
    return texts, passes


def suite_scores(model, tokenizer, cfg: BenchConfig, mode: str) -> dict:
    """Suite accuracy of one mode (mean over SUITE_TASKS, and per task) and its passes per token.

    Batched at the bench's largest batch size. Passes per token are per generated token of one row,
    a batch's pass counting once, as in the main column.
    """
    options = mode_options(mode, cfg.cfg_scale, SUITE_SCHEDULE, is_block_diffusion(model), cfg.guidance)
    limit = context_length(model)
    max_prompt = None if limit is None else limit - options.gen_length
    batch_size = max(cfg.batch_sizes)
    per_task, passes, batches = {}, 0, 0
    for task in SUITE_TASKS:
        prompts, answers = suite_requests(tokenizer, task, cfg.suite_items, max_prompt)
        texts, task_passes = complete(model, tokenizer, prompts, batch_size, **options.kwargs())
        per_task[task] = float(statistics.mean(answer_matches(t, a) for t, a in zip(texts, answers)))
        passes += task_passes
        batches += -(-len(prompts) // batch_size)
    return {"suite_accuracy": statistics.mean(per_task.values()), "suite_tasks": per_task,
            "suite_passes_per_token": passes / (batches * options.gen_length)}


def run_bench(model, cfg: BenchConfig, progress=print, tokenizer=None) -> list[dict]:
    """One row per (batch size, mode), the baseline first; see the module docstring for the columns.

    With cfg.suite_items the `tokenizer` is needed; the suite columns depend on the mode only, so
    they are measured once per mode and repeated on each batch size's row (the baseline has none).
    """
    suite = {name: suite_scores(model, tokenizer, cfg, name) for name in cfg.modes} if cfg.suite_items else {}
    device = model.device
    block = is_block_diffusion(model)
    common = cfg.schedule(block)
    sample = block_generate if block else generate
    rows = []
    for batch in cfg.batch_sizes:
        prompt = random_prompts(model.config, batch, cfg.prompt_len, cfg.seed, device)
        tokens = batch * cfg.gen_length
        (ref, base_passes), base_s = timed(lambda: baseline(model, prompt, common, block), cfg.repeats, device)
        exact = {}  # cfg_scale -> the exact output, the agreement reference
        if cfg.agreement:
            for w in sorted({0.0} | {mode_options(m, cfg.cfg_scale, common, block).cfg_scale for m in cfg.modes}):
                exact[w] = (baseline(model, prompt, common | {"cfg_scale": w, "guidance": cfg.guidance}, block)[0]
                            if block else generate(model, prompt, cfg_scale=w, guidance=cfg.guidance,
                                                   **common))[:, cfg.prompt_len:]
        name = "public algorithm, no cache (baseline)" if block else "reference (baseline)"
        rows.append(_row(batch, name, tokens, base_s, base_s, base_passes, cfg.gen_length, ref[:, cfg.prompt_len:],
                         exact.get(0.0)))
        progress(_format_row(rows[-1], bool(suite)))
        for name in cfg.modes:
            options = mode_options(name, cfg.cfg_scale, common, block, cfg.guidance)
            out, seconds = timed(lambda: sample(model, prompt, return_dict_in_generate=True, **options.kwargs()),
                                 cfg.repeats, device)
            rows.append(_row(batch, name, tokens, seconds, base_s, out.forward_passes, cfg.gen_length,
                             out.sequences[:, cfg.prompt_len:], exact.get(options.cfg_scale)) | suite.get(name, {}))
            progress(_format_row(rows[-1], bool(suite)))
    return rows


@torch.no_grad()
def quantization_error(reference, quantized, cfg: BenchConfig) -> dict:
    """How far quantized weights move a model from `reference`, the same weights unquantized.

    On the bench's first batch of prompts: the logit error (max and mean |difference|, next to the
    largest |logit| for scale) and the share of positions whose argmax is unchanged, on the canvas
    the exact mode's first step sees (the prompt, then masks); and the token agreement of the exact
    sampler at temperature 0 over the whole generation (1.0: the same output).
    """
    block = is_block_diffusion(reference)
    prompt = random_prompts(reference.config, cfg.batch_sizes[0], cfg.prompt_len, cfg.seed, reference.device)
    masks = torch.full((prompt.shape[0], cfg.gen_length), reference.config.mask_token_id, device=prompt.device)
    canvas = torch.cat([prompt, masks], dim=1)
    a, b = (m(canvas).logits.float() for m in (reference, quantized))
    sample = block_generate if block else generate
    x, y = (sample(m, prompt, **cfg.schedule(block))[:, cfg.prompt_len:] for m in (reference, quantized))
    return {"max_logit_error": float((a - b).abs().max()), "mean_logit_error": float((a - b).abs().mean()),
            "max_abs_logit": float(a.abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "token_agreement": float((x == y).float().mean()),
            "weight_bytes": weight_bytes(quantized), "reference_weight_bytes": weight_bytes(reference)}


def format_quantization_error(e: dict, quantize: str, dtype) -> str:
    return (f"{quantize} vs {str(dtype).replace('torch.', '')} weights ({e['weight_bytes'] / 2**20:,.1f} MiB vs "
            f"{e['reference_weight_bytes'] / 2**20:,.1f} MiB): logit error max {e['max_logit_error']:.4f}, "
            f"mean {e['mean_logit_error']:.4f} (largest |logit| {e['max_abs_logit']:.2f}); argmax agreement "
            f"{e['argmax_agreement']:.4f}; token agreement of exact generation at temperature 0 "
            f"{e['token_agreement']:.4f}")


def baseline(model, prompt: torch.Tensor, schedule: dict, block_diffusion: bool) -> tuple[torch.Tensor, int]:
    """(output, forward passes) of the plain algorithm the public code runs: LLaDA's `generate`
    (one pass per step), or LLaDA2's without a cache (the whole window every step)."""
    if block_diffusion:
        out = block_generate(model, prompt, cache=False, return_dict_in_generate=True, **schedule)
        return out.sequences, out.forward_passes
    return reference_generate(model, prompt, mask_id=model.config.mask_token_id, **schedule), schedule["steps"]


def _row(batch, mode, tokens, seconds, base_seconds, passes, gen_length, generated, exact) -> dict:
    agreement = None if exact is None else float((generated == exact).float().mean())
    return {"batch": batch, "mode": mode, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "passes_per_token": passes / gen_length, "speedup": base_seconds / seconds, "agreement": agreement}


def _format_row(r: dict, suite: bool = False) -> str:
    row = (f"| {r['batch']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['passes_per_token']:.3f} | "
           f"{r['speedup']:.2f}x | {'–' if r['agreement'] is None else format(r['agreement'], '.3f')} |")
    if suite:
        row += f" {r['suite_accuracy']:.3f} |" if "suite_accuracy" in r else " – |"
    return row


def hardware() -> dict:
    """Where the numbers were measured (they mean nothing without it)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table_header(suite: bool = False) -> str:
    columns = ["batch", "mode", "tokens/s", "passes/token", "speedup", "agreement"] + ["suite acc"] * suite
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def to_markdown(rows: list[dict], meta: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in meta.items() if k not in ("hardware", "quantization_error"))
    hw = ", ".join(f"{k}: {v}" for k, v in meta["hardware"].items())
    suite = bool(meta.get("suite_items"))
    error = meta.get("quantization_error")
    quantized = [format_quantization_error(error, meta["quantize"], meta["dtype"]), ""] if error else []
    return "\n".join([f"{settings}", "", f"hardware: {hw}", "", *quantized, table_header(suite),
                      *(_format_row(r, suite) for r in rows), ""])


def bench_meta(model, cfg: BenchConfig, model_name: str, dtype: torch.dtype, quantize: str | None = None,
               quantization_error: dict | None = None) -> dict:
    """The run's settings; with quantized weights also the mode and `quantization_error` (with the bytes)."""
    meta = {"model": model_name, "parameters": unsharded_parameters(model), "dtype": str(dtype).replace("torch.", ""),
            "device": str(model.device), **{k: v for k, v in asdict(cfg).items() if k != "modes"},
            "steps": cfg.total_steps, "hardware": hardware()}
    if quantize is not None:
        meta |= {"quantize": quantize, "quantization_error": quantization_error}
    return meta


def unsharded_parameters(model: MaskedDiffusionLM) -> int:
    """The model's parameter count, whole even when this rank holds a shard (counted on the meta device)."""
    with torch.device("meta"):
        return MaskedDiffusionLM(model.config).num_parameters()


def write_outputs(rows: list[dict], meta: dict, json_path=None, markdown_path=None) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(to_markdown(rows, meta))
