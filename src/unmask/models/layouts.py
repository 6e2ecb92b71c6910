"""Where each public checkpoint tensor lives in unmask's model.

The public checkpoints store gate/up and every expert (and, but for LLaDA2, q/k/v) as separate
tensors; unmask fuses and stacks them. Each layout is described once as a list of `Placement`s:
checkpoint name → (parameter name, index into that parameter). Loading copies each tensor into its
place; saving reads the same places back out, so both directions share one table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class Placement:
    checkpoint_name: str
    param_name: str
    index: tuple = ()  # applied as param[index]; () is the whole parameter


def _rows(start: int, size: int) -> tuple:
    return (slice(start, start + size),)


def placements(cfg: ModelConfig) -> list[Placement]:
    """All tensors of a checkpoint in `cfg.layout`, in a stable order."""
    return _llada_placements(cfg) if cfg.layout == "llada" else _layers_placements(cfg, _NAMES[cfg.layout])


def _attention(cfg: ModelConfig, i: int, names: dict) -> list[Placement]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    p = f"blocks.{i}.attn."
    return [
        Placement(names["q"], p + "qkv.weight", _rows(0, q)),
        Placement(names["k"], p + "qkv.weight", _rows(q, kv)),
        Placement(names["v"], p + "qkv.weight", _rows(q + kv, kv)),
        Placement(names["o"], p + "out.weight"),
    ]


def _swiglu(prefix: str, hidden: int, gate: str, up: str, down: str) -> list[Placement]:
    return [
        Placement(gate, prefix + "gate_up.weight", _rows(0, hidden)),
        Placement(up, prefix + "gate_up.weight", _rows(hidden, hidden)),
        Placement(down, prefix + "down.weight"),
    ]


def _llada_placements(cfg: ModelConfig) -> list[Placement]:
    t = "model.transformer."
    out = [Placement(t + "wte.weight", "embed.weight")]
    for i in range(cfg.n_layers):
        b = f"{t}blocks.{i}."
        out += [Placement(b + "attn_norm.weight", f"blocks.{i}.attn_norm.weight")]
        out += _attention(cfg, i, {"q": b + "q_proj.weight", "k": b + "k_proj.weight",
                                   "v": b + "v_proj.weight", "o": b + "attn_out.weight"})
        out += [Placement(b + "ff_norm.weight", f"blocks.{i}.mlp_norm.weight")]
        out += _swiglu(f"blocks.{i}.mlp.", cfg.mlp_hidden_size, b + "ff_proj.weight", b + "up_proj.weight",
                       b + "ff_out.weight")
    out.append(Placement(t + "ln_f.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        out.append(Placement(t + "ff_out.weight", "lm_head.weight"))
    return out


# The Hugging Face-style layouts share `model.layers.N.{input,post_attention}_layernorm`, `mlp.gate`,
# `mlp.experts.E.*`, the dense `mlp.{gate,up,down}_proj`, `model.norm` and `lm_head`; these differ.
_NAMES = {
    "lladamoe": {"embed": "model.embed_tokens.weight", "attn": "self_attn.", "q_norm": "q_norm.weight",
                 "k_norm": "k_norm.weight", "expert_bias": "mlp.expert_bias", "shared": "shared_expert."},
    "llada2_moe": {"embed": "model.word_embeddings.weight", "attn": "attention.", "q_norm": "query_layernorm.weight",
                   "k_norm": "key_layernorm.weight", "expert_bias": "mlp.gate.expert_bias",
                   "shared": "mlp.shared_experts."},
}


def _layers_placements(cfg: ModelConfig, names: dict) -> list[Placement]:
    out = [Placement(names["embed"], "embed.weight")]
    for i in range(cfg.n_layers):
        layer, block = f"model.layers.{i}.", f"blocks.{i}."
        a = layer + names["attn"]
        out.append(Placement(layer + "input_layernorm.weight", block + "attn_norm.weight"))
        if cfg.layout == "llada2_moe":  # q|k|v already fused, in unmask's order: H query heads, KV key, KV value heads
            out += [Placement(a + "query_key_value.weight", block + "attn.qkv.weight"),
                    Placement(a + "dense.weight", block + "attn.out.weight")]
        else:
            out += _attention(cfg, i, {"q": a + "q_proj.weight", "k": a + "k_proj.weight",
                                       "v": a + "v_proj.weight", "o": a + "o_proj.weight"})
        if cfg.qk_norm:
            out += [Placement(a + names["q_norm"], block + "attn.q_norm.weight"),
                    Placement(a + names["k_norm"], block + "attn.k_norm.weight")]
        out.append(Placement(layer + "post_attention_layernorm.weight", block + "mlp_norm.weight"))
        m = layer + "mlp."
        if cfg.moe_layers[i]:
            out.append(Placement(m + "gate.weight", block + "mlp.router.weight"))
            for e in range(cfg.n_experts):
                x = f"{m}experts.{e}."
                out += [Placement(x + "gate_proj.weight", block + "mlp.w_gate", (e,)),
                        Placement(x + "up_proj.weight", block + "mlp.w_up", (e,)),
                        Placement(x + "down_proj.weight", block + "mlp.w_down", (e,))]
            if cfg.expert_bias:
                out.append(Placement(layer + names["expert_bias"], block + "mlp.expert_bias"))
            if cfg.shared_expert_hidden_size:
                s = layer + names["shared"]
                out += _swiglu(block + "mlp.shared.", cfg.shared_expert_hidden_size, s + "gate_proj.weight",
                               s + "up_proj.weight", s + "down_proj.weight")
        else:
            out += _swiglu(block + "mlp.", cfg.mlp_hidden_size, m + "gate_proj.weight", m + "up_proj.weight",
                           m + "down_proj.weight")
    out.append(Placement("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        out.append(Placement("lm_head.weight", "lm_head.weight"))
    return out
