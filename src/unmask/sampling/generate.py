"""The masked-diffusion sampler: the reference algorithm (SPEC.md §3), batched and without its defects.

The canvas is [prompt | gen_length × MASK]. The generated part is split into blocks decoded left
to right; within a block, each step runs the model (guided when cfg_scale > 0), proposes a token
for every masked position, and commits the k most confident ones (k from `transfer_schedule`);
the rest stay masked. At batch 1, temperature 0, 'low_confidence', the output is token-identical
to the reference.

What differs from the public code, on purpose:
- prompts of different lengths are left-padded with an attention mask; padding is never attended
  to and never committed, so each row equals its prompt run alone;
- CFG works with or without an attention mask;
- the vocabulary projection and softmax run only over the positions that can still be committed
  (from the first masked position to the end of the current block), not the whole canvas;
- EOS handling: `suppress_tokens` never proposes the given ids; `eos_last` gives EOS/end-of-turn
  the lowest confidence at any temperature, so they are decided last; `stop_at_eos` ends a row
  once its text has ended (an EOS with nothing masked before it) and fills the rest with EOS.
Masks inside the prompt are positions to fill (infilling), as in the reference: they compete for
the same per-step budget as the current block from the first step on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .guidance import guided_logits
from .noise import propose_tokens
from .remasking import REMASKING_RULES, select_top, token_confidence
from .schedule import transfer_schedule


@dataclass
class StepState:
    """Handed to `callback` after every step (for visualisation and streaming); do not modify."""

    step: int                    # global step index, from 0
    block: int                   # block index, from 0
    x: torch.Tensor              # (B, T) canvas after this step
    committed: torch.Tensor      # (B, T) bool: positions committed at this step
    confidence: torch.Tensor     # (B, T) float: score of each proposal this step (nan where none)
    prompt_length: int           # canvas columns before the generated part


@dataclass
class GenerationOutput:
    sequences: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)
    forward_passes: int = 0
    steps: int = 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch token lists of different lengths: (ids, attention_mask), padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


def context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_seq_len", "max_sequence_length", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return None


def validate_request(model, prompt_length: int, steps: int, gen_length: int, block_length: int,
                     temperature: float, cfg_scale: float, remasking: str, mask_id: int) -> int:
    """Check a request and return steps per block; every error says what to change."""
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(f"steps ({steps}), gen_length ({gen_length}) and block_length ({block_length}) "
                         "must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
                         f"e.g. block_length={_largest_divisor_at_most(gen_length, block_length)}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks "
                         f"(gen_length / block_length = {num_blocks}); e.g. steps={max(num_blocks, steps // num_blocks * num_blocks)}")
    per_block = steps // num_blocks
    if per_block > block_length:
        raise ValueError(f"{per_block} steps per block but only {block_length} tokens per block: the extra steps "
                         f"would commit nothing; use steps <= {gen_length}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (got {cfg_scale}); 0 turns guidance off")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if remasking not in REMASKING_RULES:
        raise ValueError(f"unknown remasking {remasking!r}: choose one of {', '.join(REMASKING_RULES)}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id {mask_id} is outside the model's vocabulary (0..{vocab - 1})")
    limit = context_length(model)
    if limit is not None and prompt_length + gen_length > limit:
        raise ValueError(f"prompt ({prompt_length} tokens) + gen_length ({gen_length}) = "
                         f"{prompt_length + gen_length} exceeds the model's context of {limit} tokens; "
                         "shorten the prompt or lower gen_length")
    return per_block


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def special_ids(model, name: str, given: int | None) -> int | None:
    return given if given is not None else getattr(getattr(model, "config", None), name, None)


def ended_rows(gen: torch.Tensor, mask_id: int, stop_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose generated text has ended: an EOS/EOT with nothing masked before it.

    Returns (ended (B,) bool, first end position (B,) long; gen_length where none)."""
    L = gen.shape[1]
    cols = torch.arange(L, device=gen.device).expand_as(gen)
    is_stop = torch.isin(gen, stop_ids)
    first_stop = torch.where(is_stop, cols, L).min(1).values
    first_mask = torch.where(gen == mask_id, cols, L).min(1).values
    return (first_stop < L) & (first_mask > first_stop), first_stop


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    *,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    suppress_tokens: list[int] | None = None,
    eos_last: bool = False,
    stop_at_eos: bool = False,
    eos_token_id: int | None = None,
    eot_token_id: int | None = None,
    callback: Callable[[StepState], None] | None = None,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
):
    """Sample `gen_length` tokens after `prompt` (B, P); returns the canvas (B, P + gen_length).

    Keyword names follow the reference `generate`, so scripts port by changing the import.
    attention_mask (B, P): 1 for prompt tokens, 0 for left padding (see `left_pad`).
    generator: a torch.Generator for reproducible sampling (temperature > 0, 'random').
    suppress_tokens: ids never proposed (e.g. [eos] to force the full length).
    eos_last / stop_at_eos: see the module docstring; EOS/EOT ids default to the model config's.
    callback(StepState) after every step; output_history keeps every canvas (on the CPU).
    return_dict_in_generate: return a GenerationOutput (sequences, history, forward_passes, steps).
    """
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    mask_id = special_ids(model, "mask_token_id", mask_id)
    if mask_id is None:
        raise ValueError("the model config has no mask_token_id: pass mask_id")
    B, P = prompt.shape
    per_block = validate_request(model, P, steps, gen_length, block_length, temperature, cfg_scale,
                                 remasking, mask_id)
    device = prompt.device
    eos_token_id = special_ids(model, "eos_token_id", eos_token_id)
    eot_token_id = special_ids(model, "eot_token_id", eot_token_id)
    stop_ids = torch.tensor([i for i in (eos_token_id, eot_token_id) if i is not None], device=device)
    if (eos_last or stop_at_eos) and stop_ids.numel() == 0:
        raise ValueError("eos_last/stop_at_eos need an EOS id: the model config has none, pass eos_token_id")

    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(device).long(),
                                    torch.ones((B, gen_length), dtype=torch.long, device=device)], dim=1)
        valid = attention_mask.bool()
    else:
        valid = torch.ones_like(x, dtype=torch.bool)
    prompt_index = (x != mask_id) & valid
    suppressed = torch.tensor(suppress_tokens or [], dtype=torch.long, device=device)

    out = GenerationOutput(sequences=x)
    step = 0
    for block in range(gen_length // block_length):
        block_end = P + (block + 1) * block_length
        block_masked = x[:, block_end - block_length:block_end] == mask_id
        schedule = transfer_schedule(block_masked.sum(1), per_block)
        for i in range(per_block):
            candidates = (x == mask_id) & valid
            candidates[:, block_end:] = False
            if not candidates.any():
                break
            start = int(candidates.any(0).nonzero()[0])
            window = slice(start, block_end)
            logits = guided_logits(model, x, prompt_index, mask_id, cfg_scale, attention_mask, window)
            out.forward_passes += 1
            if suppressed.numel():
                logits[..., suppressed] = float("-inf")
            proposal = propose_tokens(logits, temperature, generator)
            confidence = token_confidence(logits, proposal, remasking, generator)
            if eos_last:
                confidence = confidence.masked_fill(torch.isin(proposal, stop_ids), torch.finfo(confidence.dtype).min)
            confidence = confidence.masked_fill(~candidates[:, window], float("-inf"))
            chosen = select_top(confidence, schedule[:, i])
            x_window = x[:, window]
            x_window[chosen] = proposal[chosen]
            committed = torch.zeros_like(candidates)
            committed[:, window] = chosen
            if stop_at_eos:
                ended, first_stop = ended_rows(x[:, P:], mask_id, stop_ids)
                if ended.any():
                    gen_cols = torch.arange(gen_length, device=device)
                    fill = ended[:, None] & (gen_cols[None] > first_stop[:, None])
                    x[:, P:] = x[:, P:].masked_fill(fill, eos_token_id if eos_token_id is not None else int(stop_ids[0]))
            if callback is not None:
                full_conf = torch.full(x.shape, float("nan"), device=device)
                full_conf[:, window] = confidence.float().masked_fill(confidence == float("-inf"), float("nan"))
                callback(StepState(step, block, x, committed, full_conf, P))
            if output_history:
                out.history.append(x.cpu().clone())
            step += 1
        if stop_at_eos and ended_rows(x[:, P:], mask_id, stop_ids)[0].all():
            break
    out.steps = step
    return out if return_dict_in_generate else x
