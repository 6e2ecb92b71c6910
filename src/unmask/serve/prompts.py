"""Prompts from what a client wrote: its text is text, never special tokens.

A tokenizer parses special-token strings wherever they occur, so a user who types `<|mask|>` or
`<|eot|>` would otherwise inject the mask token (silently turning a completion into infilling)
or end a chat turn early. The server encodes what clients write as plain characters, as
OpenAI's API treats text; only the chat template's own markers are tokens. A request that wants
the special tokens parsed, `<|mask|>` as a position to fill, says so with `infill`, and is then
tokenized exactly as the library does (`unmask.sampling.text.encode_prompt`).

Chat contents are told apart from the template's text by wrapping each special token found in a
content in two private-use characters before the template is rendered, then encoding the wrapped
tokens as text and the rest as usual (the approach of transformers' `sanitize_control_tokens`,
which older transformers lack). Without special-token text in any content the rendered prompt is
tokenized in one piece, so the ids are the library's.

Encoding switches the backend tokenizer's `split_special_tokens` flag, a mutation that must not
race the generation thread's decoding: `PromptEncoder` works on a private copy of the tokenizer
and is meant to be used from one thread.
"""

from __future__ import annotations

import copy
import re

from ..sampling.text import encode_prompt

START, END = "\U000f0000", "\U000f0001"    # private-use characters, dropped from client text


class PromptError(ValueError):
    """A prompt the server cannot encode as asked; the message says what to change."""


class PromptEncoder:
    """Token ids for completion prompts and chat messages, client text kept as text."""

    def __init__(self, tokenizer):
        self.tokenizer = copy.deepcopy(tokenizer)
        specials = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        specials |= set(self.tokenizer.all_special_tokens)
        longest_first = sorted(specials, key=len, reverse=True)
        self.special = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")   # (?!) never matches
        self.marked = re.compile(f"{START}({self.special.pattern}){END}")

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def completion(self, text: str, infill: bool = False) -> list[int]:
        """A plain prompt, with the tokenizer's own additions (a BOS, for tokenizers that add one)."""
        return self.tokenizer(text, split_special_tokens=not infill)["input_ids"]

    def chat(self, messages: list[dict], infill: bool = False) -> list[int]:
        """Messages through the chat template, ending with the assistant's turn header."""
        if not self.has_chat_template:
            raise PromptError("this model's tokenizer has no chat template: send the text to /v1/completions")
        if infill:
            return encode_prompt(self.tokenizer, messages)
        marked = [{**m, "content": self._mark(m["content"])} for m in messages]
        rendered = self.tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        pieces = self.marked.split(rendered)   # [template text, client's special text, template text, ...]
        ids = []
        for i, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=i % 2 == 1)["input_ids"]
        return ids

    def _mark(self, text: str) -> str:
        text = text.replace(START, "").replace(END, "")   # so a client cannot forge a marked token
        return self.special.sub(lambda m: START + m.group() + END, text)
