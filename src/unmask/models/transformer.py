"""The masked-diffusion transformer, read top to bottom.

One network covers the public LLaDA layouts: a pre-norm Llama-style stack with *bidirectional*
attention (no causal mask: every position sees every other, which is what lets one network learn
every conditional of the data), rotary positions, SwiGLU MLPs, and optionally (LLaDA-MoE, LLaDA2)
per-head q/k RMSNorm and mixture-of-experts MLPs. LLaDA2 adds partial RoPE, a head width of its own,
sigmoid group-limited routing, and is trained block-causal: that is only a mask, passed by the caller.
Projections are fused (q|k|v, gate|up) and experts are stacked so a forward pass is a handful of
large matmuls; `layouts.py` maps the public checkpoints' separate tensors into these fused ones.

The call convention is Hugging Face's, `model(input_ids, attention_mask=None, position_ids=None).logits`,
so code written for the public LLaDA checkpoints runs unchanged. Two extras serve the fast samplers:
`kv_cache` + `cache_start` run only a slice of the canvas against cached keys/values of the rest,
and `logits_slice` computes the (large) vocabulary projection only where it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


@dataclass
class MaskedLMOutput:
    """What `model(...)` returns: `.logits` of shape (B, T, V) (or the requested slice of T)."""

    logits: torch.Tensor


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the input dtype, as OLMo/OLMoE do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (B, 1, T, dim) in float32 for integer positions (B, T).

    `dim` is the number of rotated dims (the head width, or less with a partial RoPE); frequencies
    are theta^(−2i/dim). The sin table's first half is negated, so the rotation is one multiply-add
    with the halves swapped (`apply_rope`), no negation per layer.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq
    return torch.cat((freqs, freqs), dim=-1)[:, None].cos(), torch.cat((-freqs, freqs), dim=-1)[:, None].sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by the half-split convention of LLaDA/OLMo, in float32.

    With x = (x1, x2): (x1·cos − x2·sin, x2·cos + x1·sin); `sin` carries the sign of the first half.
    A partial RoPE (tables narrower than D, LLaDA2) rotates the first dims this way (dim j pairs with
    j + rot/2) and passes the rest through.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    h = x.float()
    return torch.addcmul(h * cos, h.roll(rot // 2, dims=-1), sin).to(x.dtype)


class KVCache:
    """Keys and values of every position of the canvas, per layer: (B, H_kv, T, head_dim).

    A forward pass over the slice [start, start + n) writes that slice's keys/values and attends
    over the whole buffer, so positions outside the slice are served from the cache. That is both
    the prefix cache (slice = current block to the end) and the dual cache (slice = current block).
    The first pass allocates the buffers; later passes, full-canvas refreshes included, write into
    them in place, so a cache kept across blocks keeps its storage (what a CUDA graph needs).
    With a `capacity` the buffers are allocated at that width and filled as passes go (the block
    sampler's cache grows block by block); columns not yet written must be masked out.
    """

    def __init__(self, n_layers: int, capacity: int | None = None):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.capacity = capacity   # columns to allocate; None: the first pass's width (the whole canvas)

    def update(self, layer: int, columns: slice | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v at `columns` (a slice, or a tensor of column indices) and return the buffers.

        Tensor columns write with `index_copy_`, which needs no host sync: the start of the slice
        can then change between replays of a captured graph.
        """
        if self.keys[layer] is None and self.capacity is not None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_zeros(B, H, self.capacity, D)
            self.values[layer] = v.new_zeros(B, H, self.capacity, D)
        if self.keys[layer] is None:
            if not isinstance(columns, slice) or columns.start != 0:
                raise ValueError("the first forward pass with an empty KVCache must cover the whole canvas "
                                 "(or give the cache a capacity)")
            self.keys[layer], self.values[layer] = k.clone(), v.clone()
        elif isinstance(columns, slice):
            self.keys[layer][:, :, columns] = k
            self.values[layer][:, :, columns] = v
        else:
            self.keys[layer].index_copy_(2, columns, k)
            self.values[layer].index_copy_(2, columns, v)
        return self.keys[layer], self.values[layer]

    @property
    def empty(self) -> bool:
        """No pass has written to it yet: the next one allocates it, for however many rows it runs."""
        return self.keys[0] is None

    def head_rows(self, n: int) -> "KVCache":
        """The first n batch rows as a cache of their own, sharing this one's storage (a pass over
        them writes here): the conditional rows of a guided cache, whose unconditional twins follow."""
        part = KVCache(len(self.keys), self.capacity)
        part.keys = [k[:n] if k is not None else None for k in self.keys]
        part.values = [v[:n] if v is not None else None for v in self.values]
        return part

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows, in that order (rows that finished early leave; a row given
        twice is copied)."""
        self.keys = [k[rows] if k is not None else None for k in self.keys]
        self.values = [v[rows] if v is not None else None for v in self.values]

    def copy_rows(self, source: "KVCache", rows: torch.Tensor) -> None:
        """Fill this cache with the given batch rows of `source`, into its own storage if it has some."""
        for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
            for layer, t in enumerate(theirs):
                picked = t[rows]
                if mine[layer] is not None and mine[layer].shape == picked.shape:
                    mine[layer].copy_(picked)
                else:
                    mine[layer] = picked


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim  # q_dim ≠ d_model in LLaDA2
        self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=False)
        self.out = nn.Linear(q_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, key_mask, kv_cache=None, layer=0, columns=None):
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x)
        if self.q_norm is not None:  # LLaDA-MoE and LLaDA2 normalise each head before the rotation
            qk = torch.cat([self.q_norm(qkv[..., :H * D].view(B, T, H, D)),
                            self.k_norm(qkv[..., H * D:(H + H_kv) * D].view(B, T, H_kv, D))], dim=2)
        else:  # q and k are adjacent in the fused projection's output: one view, one rotation
            qk = qkv[..., :(H + H_kv) * D].view(B, T, H + H_kv, D)
        q, k = apply_rope(qk.transpose(1, 2), cos, sin).split([H, H_kv], dim=1)
        v = qkv[..., (H + H_kv) * D:].view(B, T, H_kv, D).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, columns, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(nn.Module):
    """Routed top-k experts plus an optional shared expert (OLMoE/LLaDA-MoE, LLaDA2); see `route`.

    Experts are stacked tensors. Token-expert pairs are sorted by expert so each expert runs one
    matmul over all its tokens (grouped), never a loop over tokens; the pairs are put back in token
    order and summed, so the result is deterministic (no atomic adds).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, D = cfg.n_experts, cfg.expert_hidden_size, cfg.d_model
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.sigmoid, self.routed_scale = cfg.router == "sigmoid", cfg.routed_scale
        self.n_groups, self.topk_groups = cfg.n_groups, cfg.topk_groups
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, H, D))
        self.w_up = nn.Parameter(torch.empty(E, H, D))
        self.w_down = nn.Parameter(torch.empty(E, D, H))
        if cfg.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E))
        else:
            self.expert_bias = None
        self.shared = SwiGLU(D, cfg.shared_expert_hidden_size) if cfg.shared_expert_hidden_size else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine weights and expert ids, (N, top_k) each, for tokens x (N, D), as each public code routes.

        Scores: a softmax over the router logits (LLaDA-MoE), or independent sigmoids of logits computed
        in float32 (LLaDA2, after DeepSeek-V3). The expert bias, a load-balancing correction, is added
        to the scores to choose experts; LLaDA-MoE's code also weighs by the biased scores, LLaDA2's
        weighs by the unbiased ones. With groups only the best groups compete (`_best_groups`). The
        weights are renormalised to sum to 1 if norm_topk_prob, then scaled by routed_scale.
        """
        if self.sigmoid:
            scores = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))
        else:
            scores = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        biased = scores if self.expert_bias is None else scores + self.expert_bias
        experts = torch.topk(self._best_groups(biased), self.top_k, dim=-1).indices
        weights = (scores if self.sigmoid else biased).gather(-1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.routed_scale).to(x.dtype), experts

    def _best_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (N, E) with every expert outside the topk_groups best of n_groups contiguous groups at −inf;
        a group scores the sum of its two best experts."""
        if self.topk_groups == self.n_groups:
            return scores
        groups = scores.view(scores.shape[0], self.n_groups, scores.shape[1] // self.n_groups)  # N may be 0
        best = groups.topk(2, dim=-1).values.sum(-1).topk(self.topk_groups, dim=-1).indices
        kept = torch.zeros(groups.shape[:2], dtype=torch.bool, device=scores.device).scatter_(1, best, True)
        return groups.masked_fill(~kept[..., None], float("-inf")).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = self.routed(x)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for tokens x (N, D)."""
        weights, experts = self.route(x)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.router.weight.shape[0], dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        y = self.experts(x[order // self.top_k], counts) * weights.flatten()[order, None]
        unsorted = torch.empty_like(y).index_copy_(0, order, y)  # a permutation: no atomics, deterministic
        return unsorted.view(-1, self.top_k, x.shape[-1]).sum(1)

    def experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU on its rows: xs holds counts[e] rows for expert e, expert by expert.

        The local compute; expert parallelism (`parallel.ExpertParallel`) sends the rows to the
        ranks holding their experts and runs this there on each rank's own experts.
        """
        h = F.silu(grouped_matmul(xs, self.w_gate, counts)) * grouped_matmul(xs, self.w_up, counts)
        return grouped_matmul(h, self.w_down, counts)


def _has_grouped_mm(x: torch.Tensor) -> bool:
    """Whether F.grouped_mm takes x: on the CPU in 16/32-bit floats, on CUDA in bfloat16; inference only
    (its backward fails on the CPU in torch 2.13, so training takes the loop)."""
    if torch.is_grad_enabled():
        return False
    supported = (torch.float32, torch.bfloat16, torch.float16) if x.device.type == "cpu" else (torch.bfloat16,)
    return hasattr(F, "grouped_mm") and x.dtype in supported


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows for expert e, in order) times weight[e].T.

    One `grouped_mm` kernel where PyTorch has one for this device and dtype: it needs no host sync,
    so a forward pass through MoE layers can be captured as a CUDA graph. Otherwise a loop over
    the experts with rows (that reads `counts` on the host).
    """
    if _has_grouped_mm(x):
        offsets = counts.cumsum(0, dtype=torch.int32)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    parts = [xe @ weight[e].T for e, xe in enumerate(x.split(counts.tolist())) if xe.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if moe else SwiGLU(cfg.d_model, cfg.mlp_hidden_size)

    def forward(self, x, cos, sin, key_mask, kv_cache=None, layer=0, columns=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, key_mask, kv_cache, layer, columns)
        return x + self.mlp(self.mlp_norm(x))


class MaskedDiffusionLM(nn.Module):
    """Bidirectional transformer returning per-position logits over the vocabulary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, moe) for moe in cfg.moe_layers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int | torch.Tensor = 0,
        logits_slice: slice | None = None,
    ) -> MaskedLMOutput:
        """Logits for `input_ids` (B, T).

        attention_mask: None attends everywhere (fully bidirectional). (B, T_total) with 1 for real
        tokens and 0 for padding: padding is never attended to, and positions count real tokens only,
        so a left-padded prompt sees the same positions as the prompt alone. Or a 4D (B or 1, 1, T,
        T_total) mask, as LLaDA2's block-causal attention and packed documents need: boolean, True
        where a query may attend to a key, or additive float of any dtype, 0 where it may and −inf
        (or a large negative such as Hugging Face's finfo.min) where it may not, added to the scores
        as the public code does (cast to the model's dtype, which SDPA requires: a bfloat16 mask for
        a float32 model is exact, and a float32 finfo.min becomes −inf in 16-bit, still blocking).
        position_ids: (B or 1, T) positions of `input_ids`; by default they count from 0 across the
        canvas (or real tokens, with a 2D mask). With `kv_cache`, `input_ids` is the slice of the
        canvas that starts at `cache_start`, and attention_mask still covers the whole canvas. A
        0-dim tensor `cache_start` makes the pass free of host syncs (for CUDA graphs); an int slices.
        logits_slice: compute logits only for these positions of `input_ids`.
        """
        B, T = input_ids.shape
        if kv_cache is None:
            total = T
        else:
            total = kv_cache.keys[0].shape[2] if kv_cache.keys[0] is not None else kv_cache.capacity or T
        if isinstance(cache_start, torch.Tensor):
            columns = cache_start + torch.arange(T, device=input_ids.device)
        else:
            columns = slice(cache_start, cache_start + T)
        pairwise = attention_mask is not None and attention_mask.dim() == 4
        if position_ids is None:
            if attention_mask is not None and not pairwise:
                full = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                full = torch.arange(total, device=input_ids.device).expand(B, total)
            position_ids = full[:, columns]
        cos, sin = rope_tables(position_ids, self.config.rotary_dim, self.config.rope_theta)
        if attention_mask is None:
            key_mask = None
        elif not pairwise:
            key_mask = attention_mask.bool()[:, None, None, :]
        elif attention_mask.is_floating_point():  # additive
            key_mask = attention_mask.to(self.dtype)
        else:
            key_mask = attention_mask.bool()
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, key_mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, key_mask, kv_cache, i, columns)
        if logits_slice is not None:
            x = x[:, logits_slice]
        return MaskedLMOutput(logits=self.lm_head(self.norm(x)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
