"""Training data: local files → token ids (cached) → fixed-length rows → resumable batches.

Inputs (local files only):
* `.txt`: one document per blank-line-separated paragraph (a file of short paragraphs becomes
  many documents; a whole book with no blank lines is one document).
* `.jsonl`: pretraining rows `{"text": ...}`; SFT rows `{"prompt", "response"}` or
  `{"messages": [{"role", "content"}, ...]}` whose last message is the assistant's response.

Pretraining rows: every document plus EOS, concatenated and cut into `seq_len` pieces (packing, as
LLaDA does; the tail is padded with EOS). SFT rows (LLaDA SFT style): the chat-templated prompt
(`add_generation_prompt=True`), then the assistant turn as the template renders it, then EOS
repeated to `seq_len`; the EOS padding is part of the response so the model learns where to stop.

The held-out split is by document content (a hash of the text), so it does not move when files
are reordered or appended to. Tokenisation is cached per (file content, tokenizer, format) in
`cache_dir`, so a second run or a resume starts without re-tokenising.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .objective import Batch

CACHE_VERSION = 1


# ---- reading ---------------------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> list:
    """Documents (str) or SFT examples ((messages prompt, response text)) of one file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    if p.suffix == ".txt":
        paragraphs = p.read_text(encoding="utf-8").split("\n\n")
        return [d.strip("\n") for d in paragraphs if d.strip()]
    if p.suffix != ".jsonl":
        raise ValueError(f"{p}: unsupported data file type (use .txt or .jsonl)")
    records = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(_record(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{p}:{n}: expected {{'text'}}, {{'prompt','response'}} or {{'messages'}} ({e})") from None
    return records


def _record(row: dict):
    if "text" in row:
        return str(row["text"])
    if "prompt" in row:
        return ([{"role": "user", "content": row["prompt"]}], row["response"])
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's response")
    return (messages[:-1], messages[-1]["content"])


# ---- tokenising ------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how text becomes ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def _split_chat(tokenizer, prompt_messages: list[dict], response: str) -> tuple[str, str]:
    """(prompt text up to the generation prompt, the assistant turn as the template renders it)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n".join(m["content"] for m in prompt_messages), response
    prompt = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt_messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):  # a template that renders the turn differently: keep the raw response
        return prompt, response
    return prompt, full[len(prompt):]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def tokenize_file(path: str | os.PathLike, tokenizer, cache_dir: str | os.PathLike | None) -> dict:
    """{"docs": [ids, ...]} or {"prompts": [...], "responses": [...]}, plus "keys" (one content
    hash per record, for the held-out split); cached on disk."""
    p = Path(path)
    key = hashlib.sha256(f"v{CACHE_VERSION}".encode() + hashlib.sha256(p.read_bytes()).digest()
                         + tokenizer_fingerprint(tokenizer).encode()).hexdigest()[:24]
    cache = Path(cache_dir) / f"{p.stem}-{key}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # a damaged cache is only a cache: rebuild it
            pass
    records = read_records(p)
    docs = [r for r in records if isinstance(r, str)]
    pairs = [r for r in records if not isinstance(r, str)]
    if docs and pairs:
        raise ValueError(f"{p} mixes pretraining ('text') and SFT rows; use one kind per file")
    if pairs:
        split = [_split_chat(tokenizer, m, r) for m, r in pairs]
        out = {"prompts": _encode(tokenizer, [a for a, _ in split]),
               "responses": _encode(tokenizer, [b for _, b in split]),
               "keys": [_text_key(a + b) for a, b in split]}
    else:
        out = {"docs": _encode(tokenizer, docs), "keys": [_text_key(d) for d in docs]}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        os.close(fd)
        torch.save(out, tmp)
        os.replace(tmp, cache)
    return out


def _text_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


# ---- rows ------------------------------------------------------------------------------------

@dataclass
class Rows:
    """Fixed-length training rows; prompt_lengths is None for pretraining; segments (packed
    pretraining rows with document attention) numbers the document each token belongs to."""

    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor) -> Batch:
        pl = None if self.prompt_lengths is None else self.prompt_lengths[index]
        seg = None if self.segments is None else self.segments[index]
        return Batch(self.input_ids[index], pl, seg)


def pack(docs: list[list[int]], seq_len: int, eos_id: int, segments: bool = False) -> Rows:
    """Each document + EOS, concatenated and cut into rows of seq_len (tail padded with EOS).

    segments: also number each token's document (the tail padding is one more), so that
    training can keep attention inside documents (`Batch.segments`).
    """
    if not docs:
        raise ValueError("no documents to pack")
    flat = torch.tensor(list(itertools.chain.from_iterable(d + [eos_id] for d in docs)), dtype=torch.long)
    pad = -len(flat) % seq_len
    flat = torch.cat([flat, flat.new_full((pad,), eos_id)])
    if not segments:
        return Rows(flat.view(-1, seq_len))
    lengths = torch.tensor([len(d) + 1 for d in docs] + ([pad] if pad else []))
    doc_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return Rows(flat.view(-1, seq_len), segments=doc_of.view(-1, seq_len))


def sft_rows(prompts: list[list[int]], responses: list[list[int]], seq_len: int, eos_id: int) -> tuple[Rows, int]:
    """One row per example: prompt | response | EOS… to seq_len. Returns (rows, examples dropped).

    Examples that do not fit with at least one EOS are dropped rather than cut: a cut response would
    teach the model to stop mid-answer.
    """
    ids, lengths, dropped = [], [], 0
    for p, r in zip(prompts, responses):
        if len(p) + len(r) + 1 > seq_len:
            dropped += 1
            continue
        ids.append(p + r + [eos_id] * (seq_len - len(p) - len(r)))
        lengths.append(len(p))
    if not ids:
        raise ValueError(f"no SFT example fits in seq_len={seq_len} ({dropped} dropped); raise --seq-len")
    return Rows(torch.tensor(ids, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)), dropped


def build_rows(paths: list[str], tokenizer, seq_len: int, heldout_frac: float, cache_dir,
               eval_paths: list[str] | None = None, segments: bool = False) -> tuple[Rows, Rows | None, dict]:
    """(train rows, held-out rows or None, info). Held-out: `eval_paths`, else a hashed fraction.
    segments: packed pretraining rows carry their document numbers (see `pack`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (eos_token); training needs one")
    parts = [tokenize_file(p, tokenizer, cache_dir) for p in paths]
    kinds = {"prompts" in part for part in parts}
    if len(kinds) > 1:
        raise ValueError("the data files mix pretraining and SFT files; train on one kind at a time")
    sft = kinds.pop()

    def merge(parts, select):
        fields = ("prompts", "responses") if sft else ("docs",)
        return {f: [x for part in parts for x, k in zip(part[f], part["keys"]) if select(k)] for f in fields}

    if eval_paths:
        train = merge(parts, lambda k: True)
        held = merge([tokenize_file(p, tokenizer, cache_dir) for p in eval_paths], lambda k: True)
    else:
        cut = int(heldout_frac * 2**32)
        train = merge(parts, lambda k: k >= cut)
        held = merge(parts, lambda k: k < cut)

    def rows(d):
        if sft:
            return sft_rows(d["prompts"], d["responses"], seq_len, eos)
        return pack(d["docs"], seq_len, eos, segments), 0

    first = next(iter(held.values()))
    train_rows, dropped = rows(train)
    held_rows = rows(held)[0] if first else None
    info = {"sft": sft, "train_rows": len(train_rows), "heldout_rows": len(held_rows) if held_rows else 0,
            "dropped": dropped}
    return train_rows, held_rows, info


# ---- batches ---------------------------------------------------------------------------------

class BatchStream:
    """Endless shuffled batches; `state_dict()` (epoch, offset) is the exact position to resume from.

    Each epoch is a permutation of the rows drawn from (seed, epoch); a global batch is the next
    batch_size × world_size indices of that stream (running on into the next epoch when one ends),
    and each rank takes its own contiguous slice, so ranks never see the same row in a step.
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> Batch:
        need = self.batch_size * self.world_size
        taken = []
        while need:
            chunk = self._order[self.offset:self.offset + need]
            taken.append(chunk)
            need -= len(chunk)
            self.offset += len(chunk)
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        index = torch.cat(taken)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.rows.batch(index)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data order used seed {state['seed']}, this run {self.seed}")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)


def heldout_batches(rows: Rows, batch_size: int, n_batches: int) -> list[Batch]:
    """The first n_batches × batch_size held-out rows in file order: the same set in every run."""
    n = min(len(rows), batch_size * n_batches)
    return [rows.batch(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
