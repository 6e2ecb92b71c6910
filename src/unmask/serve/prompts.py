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
race the generation thread's decoding nor another request's encoding: `PromptEncoder` works on a
private copy of the tokenizer per thread, so the server can tokenize several prompts at once (one
client's long prompt does not queue everyone else's).

The cost of tokenizing grows with the text, so the server bounds it first: `max_characters` is the
most characters a prompt of a given number of tokens can have (its longest token's length times
the tokens), so a longer text is refused for the context without being tokenized. A chat content
made of special-token text (say a million `<|eot|>`) is tokenized in one batched call, its special
tokens looked up once each, rather than one call per token.
"""

from __future__ import annotations

import copy
import re
import threading

from ..sampling.text import encode_prompt

START, END = "\U000f0000", "\U000f0001"    # private-use characters, dropped from client text


class PromptError(ValueError):
    """A prompt the server cannot encode as asked; the message says what to change."""


class PromptEncoder:
    """Token ids for completion prompts and chat messages, client text kept as text; safe to use
    from several threads (each encodes with its own copy of the tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = copy.deepcopy(tokenizer)
        self._local = threading.local()
        self._special_as_text: dict[str, list[int]] = {}
        specials = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        specials |= set(self.tokenizer.all_special_tokens)
        longest_first = sorted(specials, key=len, reverse=True)
        self.special = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")   # (?!) never matches
        self.marked = re.compile(f"{START}({self.special.pattern}){END}")
        self.longest_token = max(map(len, self.tokenizer.get_vocab()), default=1)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def max_characters(self, tokens: int) -> int:
        """The most characters `tokens` tokens can spell: a text longer than this cannot fit in them,
        which is known without tokenizing it. (A token's vocabulary entry is at least as long as
        the text it stands for, for byte-level and SentencePiece vocabularies alike.)"""
        return max(tokens, 0) * self.longest_token

    def completion(self, text: str, infill: bool = False) -> list[int]:
        """A plain prompt, with the tokenizer's own additions (a BOS, for tokenizers that add one)."""
        return self._tokenizer()(text, split_special_tokens=not infill)["input_ids"]

    def chat(self, messages: list[dict], infill: bool = False) -> list[int]:
        """Messages through the chat template, ending with the assistant's turn header."""
        if not self.has_chat_template:
            raise PromptError("this model's tokenizer has no chat template: send the text to /v1/completions")
        tokenizer = self._tokenizer()
        if infill:
            return encode_prompt(tokenizer, messages)
        marked = [{**m, "content": self._mark(m["content"])} for m in messages]
        rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        pieces = self.marked.split(rendered)   # [template text, client's special text, template text, ...]
        texts = [p for p in pieces[0::2] if p]
        encoded = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=False)["input_ids"]
                       if texts else [])
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += self._as_text(tokenizer, piece)
            elif piece:
                ids += next(encoded)
        return ids

    def _tokenizer(self):
        """This thread's copy of the tokenizer (see the module docstring)."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tokenizer

    def _as_text(self, tokenizer, special: str) -> list[int]:
        """A special token's text encoded as plain text, computed once per token."""
        if special not in self._special_as_text:
            self._special_as_text[special] = tokenizer(special, add_special_tokens=False,
                                                       split_special_tokens=True)["input_ids"]
        return self._special_as_text[special]

    def _mark(self, text: str) -> str:
        text = text.replace(START, "").replace(END, "")   # so a client cannot forge a marked token
        return self.special.sub(lambda m: START + m.group() + END, text)
