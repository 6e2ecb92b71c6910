"""Train the small byte-level BPE tokenizer of unmask's bundled default model.

Why byte-level BPE: it round-trips any text exactly (``decode(encode(t)) == t``,
including newlines and punctuation), needs no unknown token, and with a
~2k vocabulary on the regular synthetic corpus of :mod:`unmask.data.world`
nearly every word is a single token, which keeps documents short enough for
a 256-token context.

Special tokens (ids fixed, in this order, at the start of the vocabulary):

====================  ==  ===============================================
``<|endoftext|>``      0  EOS, also used as padding
``<|mask|>``           1  the mask token of the masked diffusion model
``<|user|>``           2  start of a user turn
``<|assistant|>``      3  start of an assistant turn
``<|system|>``         4  start of a system turn
``<|eot|>``            5  end of turn
====================  ==  ===============================================

The chat template renders ``<|role|>\\ncontent<|eot|>`` per message and, with
``add_generation_prompt=True``, appends ``<|assistant|>\\n``.

CLI::

    python -m unmask.data.tokenizer --corpus train.jsonl --out DIR --vocab-size 2048
"""

from __future__ import annotations

import argparse
import json
from typing import Iterable, Iterator

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
EOT_TOKEN = "<|eot|>"
SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, EOT_TOKEN]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _wrap(tok):
    """Wrap a ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with our specials."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf.add_special_tokens({"additional_special_tokens": [USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, EOT_TOKEN]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Special tokens get ids 0..5 (see module docstring).  No BOS/EOS is added
    automatically by ``encode`` -- training code appends EOS itself -- so
    ``decode(encode(t)) == t`` holds exactly for any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return _wrap(tok)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the tokens the MDM code needs: mask, eos (= pad), eot, user, assistant, system."""
    conv = tokenizer.convert_tokens_to_ids
    return {
        "mask": conv(MASK_TOKEN),
        "eos": conv(EOS_TOKEN),
        "pad": tokenizer.pad_token_id,
        "eot": conv(EOT_TOKEN),
        "user": conv(USER_TOKEN),
        "assistant": conv(ASSISTANT_TOKEN),
        "system": conv(SYSTEM_TOKEN),
    }


def iter_jsonl_texts(path: str, fields: tuple[str, ...] = ("text", "prompt", "response")) -> Iterator[str]:
    """Yield the string fields of a JSONL file (``text`` or ``prompt``/``response``)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for k in fields:
                if isinstance(row.get(k), str):
                    yield row[k]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m unmask.data.tokenizer", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, nargs="+", help="JSONL file(s) with a 'text' (or prompt/response) field")
    ap.add_argument("--out", required=True, help="output directory (save_pretrained)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args(argv)

    def texts():
        for path in args.corpus:
            yield from iter_jsonl_texts(path)

    tok = train_tokenizer(texts(), args.vocab_size)
    tok.save_pretrained(args.out)
    print(f"saved tokenizer (vocab {len(tok)}) to {args.out}; special ids {special_token_ids(tok)}")


if __name__ == "__main__":
    main()
