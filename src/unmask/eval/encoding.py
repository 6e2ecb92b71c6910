"""Text -> token ids for scoring, split at the context/continuation boundary as lm-eval does."""

from __future__ import annotations


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def encode_pair(tokenizer, context: str, continuation: str, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for scoring `continuation` after `context`.

    As lm-eval: trailing spaces of the context move to the continuation, and the pair is encoded
    as one text then split, so the boundary tokenises as it would in running text. A BOS token is
    put in front when the tokenizer has one (LLaDA's evaluation does the same). When the pair is
    longer than `max_len`, the context is cut from the left; the continuation is never cut.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else encode(tokenizer, continuation)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ctx = [bos] + ctx
    if max_len is not None and len(ctx) + len(cont) > max_len:
        if len(cont) > max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context "
                             f"of {max_len} tokens")
        ctx = ctx[len(ctx) + len(cont) - max_len:]
    return ctx, cont
