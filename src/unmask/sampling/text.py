"""Strings in, strings out: tokenising prompts (optionally through the chat template) and cutting
completions at the end of the text, around `generate`.
"""

from __future__ import annotations

import torch

from .blocks import block_generate, is_block_diffusion
from .generate import generate, left_pad, special_ids


def encode_prompt(tokenizer, text: str | list[dict], chat: bool = False) -> list[int]:
    """Token ids of a prompt; with chat=True (or a list of messages) through the chat template."""
    if chat or isinstance(text, list):
        messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this checkpoint's tokenizer has no chat template: drop --chat")
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS and end-of-turn ids, from the model config first, then the tokenizer."""
    cfg = getattr(model, "config", None)
    ids = [getattr(cfg, "eos_token_id", None), getattr(cfg, "eot_token_id", None), tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids("<|eot|>") if "<|eot|>" in tokenizer.get_vocab() else None
    return sorted({i for i in ids + [eot] if isinstance(i, int)})


def completion_ids(generated: list[int], stop_ids: list[int], mask_id: int | None = None) -> tuple[list[int], bool]:
    """The generated ids up to the first stop token; (ids, whether a stop token ended them).

    Masks left over (a canvas that was not fully decoded) are dropped."""
    out = []
    for t in generated:
        if t in stop_ids:
            return out, True
        if t != mask_id:
            out.append(t)
    return out, False


def generate_text(model, tokenizer, prompts: list[str] | list[list[dict]], chat: bool = False,
                  batch_size: int | None = None, **kwargs) -> list[str]:
    """Complete each prompt; returns the text up to the end of each completion.

    `batch_size`: run the prompts that many at a time (all at once when None), to bound memory;
    each row's text is what it gives alone, so the split changes no output.
    kwargs go to `generate` (steps, gen_length, block_length, cfg_scale, ...)."""
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    step = batch_size or max(len(ids), 1)
    return [text for start in range(0, len(ids), step)
            for text in complete_ids(model, tokenizer, ids[start:start + step], **kwargs)[0]]


def complete_ids(model, tokenizer, prompts: list[list[int]], **kwargs) -> tuple[list[str], int]:
    """(completion texts, forward passes) for token-id prompts, batched with left padding.

    kwargs are the model family's sampler keywords (`generate`'s, or `block_generate`'s for a
    LLaDA2.x model). Ends of text are decided last and finished rows stop early unless the caller
    says otherwise.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    batch, attention = left_pad(prompts, pad)
    stops = stop_token_ids(model, tokenizer)
    block = is_block_diffusion(model)
    if stops and block:
        kwargs.setdefault("eos_id", special_ids(model, "eos_token_id", None) or stops[0])
    elif stops:
        kwargs.setdefault("eos_last", True)
        kwargs.setdefault("stop_at_eos", True)
        kwargs.setdefault("eos_token_id", stops[0])
    kwargs["return_dict_in_generate"] = True
    sampler = block_generate if block else generate
    out = sampler(model, batch.to(model.device), attention_mask=attention.to(model.device), **kwargs)
    mask_id = special_ids(model, "mask_token_id", kwargs.get("mask_id"))
    texts = []
    for row in out.sequences[:, batch.shape[1]:].tolist():
        kept, _ = completion_ids(row, stops, mask_id)
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts, out.forward_passes


def decode_canvas(tokenizer, row: torch.Tensor, mask_id: int, mask_text: str = "·") -> list[str]:
    """One string per position, masks shown as `mask_text` (for live views of the denoising)."""
    return [mask_text if t == mask_id else tokenizer.decode([t]) for t in row.tolist()]
