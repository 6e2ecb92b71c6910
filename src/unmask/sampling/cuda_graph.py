"""The dual cache's block step as one CUDA graph: the per-step forward without launch overhead.

At batch 1 on a large GPU a cached step is bound by kernel launches and Python, not by the GPU:
an 8B model's step over a 32-token block launches hundreds of kernels whose work takes about as
long as reading the weights once (~5 ms on an H100). Capturing the step once and replaying it
turns those launches into one.

A graph replays fixed shapes at fixed addresses, so the runner keeps, per (rows, canvas length):
- one KV cache whose buffers live for the whole run: every block's full-canvas refresh (run
  eagerly, its shape is different) writes into them in place;
- static input buffers (block ids, the block's start as a 0-dim tensor, the attention mask) that
  each step copies into before the replay; the block's start being a tensor is what lets one
  graph serve every block (`KVCache.update` writes by column index, with no host sync).
Rows never drop out of a graphed step (the batch size is part of the shape): a row with nothing
left to commit is computed and ignored. Each shape holds a cache and graphs, so only the
`max_shapes` most recently used shapes are kept (varying prompt lengths would otherwise grow
memory without bound).

On a CPU the same static-buffer path runs without capture, so the tests cover everything but the
capture itself. With `forward` a torch.compile'd model, the compiled (fused) kernels are what the
graph captures: fewer, larger kernels per layer, which is what the graph step is bound by.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..models.transformer import KVCache, MaskedLMOutput


@dataclass
class _CapturedStep:
    ids: torch.Tensor                    # (rows, width) block tokens
    start: torch.Tensor                  # 0-dim long: the block's first canvas column
    attention_mask: torch.Tensor | None  # (rows, total)
    logits: torch.Tensor | None = None   # (rows, width, vocab): the graph's output
    graph: "torch.cuda.CUDAGraph | None" = None


class GraphedBlockStep:
    """Callable like the model; full-canvas refreshes run eagerly, block steps replay a graph.

    `_orig_mod` marks it, like a torch.compile'd model, as a wrapper of unmask's own model that
    computes the logits of every column it runs (the sampler slices them). `forward` is the model
    itself or its torch.compile'd twin.
    """

    def __init__(self, model, max_shapes: int = 8, forward=None):
        self._orig_mod = model
        self.forward = model if forward is None else forward
        self.config = model.config
        self.max_shapes = max_shapes
        self.caches: OrderedDict[tuple[int, int], KVCache] = OrderedDict()
        self.steps: dict[tuple, _CapturedStep] = {}

    def kv_cache(self, rows: int, total: int) -> KVCache:
        """The long-lived cache for `rows` canvas rows of length `total` (least recently used dropped)."""
        key = (rows, total)
        if key not in self.caches:
            self.caches[key] = KVCache(self.config.n_layers)
            if len(self.caches) > self.max_shapes:
                _, dropped = self.caches.popitem(last=False)
                self.steps = {k: v for k, v in self.steps.items() if k[0] != id(dropped)}
        self.caches.move_to_end(key)
        return self.caches[key]

    def __call__(self, input_ids, attention_mask=None, kv_cache=None, cache_start=0):
        """Logits of every column of input_ids (the sampler slices them: `_orig_mod` says so)."""
        if kv_cache is None or kv_cache.empty or input_ids.shape[1] == kv_cache.keys[0].shape[2]:
            return self.forward(input_ids, attention_mask=attention_mask, kv_cache=kv_cache, cache_start=cache_start)
        step = self._step(kv_cache, input_ids, attention_mask)
        step.ids.copy_(input_ids)
        step.start.fill_(cache_start)
        if attention_mask is not None:
            step.attention_mask.copy_(attention_mask)
        if step.logits is None and input_ids.device.type == "cuda":
            self._capture(step, kv_cache)  # with this step's inputs: the warm-up passes write its cache slice
        if step.graph is None:
            step.logits = self._forward(step, kv_cache)
        else:
            step.graph.replay()
        return MaskedLMOutput(logits=step.logits)

    def _forward(self, step: _CapturedStep, kv_cache: KVCache) -> torch.Tensor:
        return self.forward(step.ids, attention_mask=step.attention_mask, kv_cache=kv_cache,
                            cache_start=step.start).logits

    def _step(self, kv_cache: KVCache, input_ids: torch.Tensor, attention_mask) -> _CapturedStep:
        key = (id(kv_cache), tuple(input_ids.shape), attention_mask is not None)
        if key not in self.steps:
            self.steps[key] = _CapturedStep(
                ids=torch.empty_like(input_ids), start=torch.zeros((), dtype=torch.long, device=input_ids.device),
                attention_mask=None if attention_mask is None else torch.empty_like(attention_mask))
        return self.steps[key]

    def _capture(self, step: _CapturedStep, kv_cache: KVCache) -> None:
        """Warm up on a side stream (allocator, cuBLAS handles), then capture one step.

        The static inputs already hold this step's tokens and block start, so the warm-up passes
        write exactly the slice the replay that follows writes again: nothing is left stale. (With
        any other start they would overwrite another block's cached keys/values.)
        """
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(step, kv_cache)
        torch.cuda.current_stream().wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph):
            step.logits = self._forward(step, kv_cache)


def graphed(model, forward=None) -> GraphedBlockStep:
    """The model's GraphedBlockStep for `forward` (default: the model itself), built once and kept.

    Graphs and caches are reused across calls. Kept in the model's __dict__, not as a submodule, so
    state_dict() and parameters() are unchanged.
    """
    forward = model if forward is None else forward
    runners = model.__dict__.setdefault("_unmask_graphed", {})
    if id(forward) not in runners:
        runners[id(forward)] = GraphedBlockStep(model, forward=forward)
    return runners[id(forward)]
