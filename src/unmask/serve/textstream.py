"""From a diffusion canvas to text that, once sent, never changes.

An autoregressive streamer can send every new token. A masked diffusion model commits tokens
anywhere in the current block, so the only text that is final is the committed prefix: the
generated positions left of the first mask. `RowText` follows one row of a batch step by step
and releases only that prefix, minus anything that could still change:
- a trailing replacement character (a multi-byte character whose later bytes are still masked);
- a suffix that could be the start of a stop sequence.
The text ends at the first EOS/end-of-turn (with nothing masked before it) or at the first stop
sequence; once it has ended the row is finished even if other rows of the batch are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass
class Ending:
    """How a row's text ended: the final text, why, and how many generated tokens it used."""

    text: str
    finish_reason: str           # "stop" (EOS, end of turn or a stop sequence) or "length"
    completion_tokens: int


class RowText:
    """The stable text of one row; `update` after each step returns only the new part."""

    def __init__(self, tokenizer, mask_id: int, end_ids: set[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.end_ids = end_ids
        self.stop = [s for s in stop if s]
        self.sent = ""
        self.ending: Ending | None = None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, gen: list[int], final: bool = False) -> str:
        """Feed the row's generated canvas; return text not sent before. `final`: nothing is masked."""
        if self.ending is not None:
            return ""
        committed = next((i for i, t in enumerate(gen) if t == self.mask_id), len(gen))
        end = next((i for i in range(committed) if gen[i] in self.end_ids), None)
        if end is not None:
            ending = Ending(self.decode(gen[:end]), "stop", end + 1)
        elif committed == len(gen) or final:
            ending = Ending(self.decode(gen[:committed]), "length", committed)
        else:
            ending = None
        text = ending.text if ending else self.decode(gen[:committed])
        hit = self._first_stop(text)
        if hit is not None:
            cut, stop = hit
            ending = Ending(text[:cut], "stop", self._tokens_to_reach(gen[:committed], cut + len(stop)))
        if ending is not None:
            self.ending = ending
            return self._advance(ending.text)
        return self._advance(self._hold_back(text.rstrip("\ufffd")))

    def _advance(self, stable: str) -> str:
        """The part of `stable` after what was sent; nothing if `stable` does not extend it."""
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""
        delta, self.sent = stable[len(self.sent):], stable
        return delta

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """(position, stop sequence) of the earliest stop sequence in `text`."""
        hits = [(text.find(s), s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def _hold_back(self, text: str) -> str:
        """Drop the longest suffix of `text` that is a proper prefix of a stop sequence."""
        keep = len(text)
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = min(keep, len(text) - n)
                    break
        return text[:keep]

    def _tokens_to_reach(self, gen: list[int], chars: int) -> int:
        """The fewest generated tokens whose text has `chars` characters (up to the stop's end)."""
        return next((k for k in range(len(gen) + 1) if len(self.decode(gen[:k])) >= chars), len(gen))


def piece_decoder(tokenizer):
    """id -> its text on its own, cached (for the canvas view; a partial character shows as '\ufffd')."""
    @lru_cache(maxsize=65536)
    def piece(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    return piece
