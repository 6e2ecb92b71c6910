"""Model configuration: one dataclass for both public LLaDA layouts.

The public checkpoints describe the same kind of network with two vocabularies of config keys:
LLaDA-8B uses OLMo's (`d_model`, `n_layers`, `mlp_hidden_size`, ...) and LLaDA-MoE uses OLMoE's
(`hidden_size`, `num_hidden_layers`, `num_experts`, ...). `ModelConfig` is the one shape unmask
works with; `from_hf_dict` / `to_hf_dict` translate, so a checkpoint written by unmask is read by
the public code and vice versa.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Special ids of the public checkpoints, which their config.json files do not all record.
# Keyed by (layout, vocab_size). Source: the LLaDA / LLaDA-MoE model cards and tokenizer files.
KNOWN_SPECIAL_IDS = {
    ("llada", 126464): {"mask_token_id": 126336, "eos_token_id": 126081, "eot_token_id": 126348},
    ("lladamoe", 157184): {"mask_token_id": 156895, "eos_token_id": 156892, "eot_token_id": None},
}


@dataclass
class ModelConfig:
    """Shape and special ids of a bidirectional masked-diffusion transformer.

    `layout` names the checkpoint layout the weights are read from and written to: "llada" (dense,
    OLMo-style names) or "lladamoe" (OLMoE-style names, optional experts).
    """

    layout: str = "llada"
    vocab_size: int = 384
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_hidden_size: int = 160
    max_seq_len: int = 512
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    # Mixture of experts (layout "lladamoe"); n_experts == 0 means every layer is dense.
    n_experts: int = 0
    experts_per_token: int = 0
    expert_hidden_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_hidden_size: int | None = None
    expert_bias: bool = False
    moe_layers: list[bool] = field(default_factory=list)
    tie_embeddings: bool = False
    mask_token_id: int | None = 383
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.layout not in ("llada", "lladamoe"):
            raise ValueError(f"unknown layout {self.layout!r}: use 'llada' or 'lladamoe'")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not self.moe_layers:
            self.moe_layers = [self.n_experts > 0] * self.n_layers
        if len(self.moe_layers) != self.n_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        if any(self.moe_layers) and not (self.n_experts and self.experts_per_token and self.expert_hidden_size):
            raise ValueError("MoE layers need n_experts, experts_per_token and expert_hidden_size")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    # ---- Hugging Face config.json translation -------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a public config.json (either layout). Raises ValueError for unsupported features."""
        model_type = d.get("model_type", "")
        if "d_model" in d:  # OLMo-style keys: LLaDA dense
            cfg = _from_llada_dict(d)
        elif "hidden_size" in d and model_type in ("lladamoe", "llada"):
            cfg = _from_lladamoe_dict(d)
        else:
            raise ValueError(
                f"unknown architecture (model_type {model_type!r}): unmask reads LLaDA ('llada', OLMo-style keys) "
                "and LLaDA-MoE ('lladamoe') checkpoints natively; for other models pass trust_remote_code=True "
                "(--trust-remote-code) to use the checkpoint's own modeling code"
            )
        return cfg

    def to_hf_dict(self) -> dict:
        """config.json in this config's layout, readable by the public modeling code."""
        return _to_llada_dict(self) if self.layout == "llada" else _to_lladamoe_dict(self)

    def to_dict(self) -> dict:
        return asdict(self)


def _special_ids(layout: str, d: dict, vocab_size: int) -> dict:
    known = KNOWN_SPECIAL_IDS.get((layout, vocab_size), {})
    ids = {
        "mask_token_id": d.get("mask_token_id", known.get("mask_token_id")),
        "eos_token_id": d.get("eos_token_id", known.get("eos_token_id")),
        "eot_token_id": d.get("eot_token_id", known.get("eot_token_id")),
        "pad_token_id": d.get("pad_token_id"),
    }
    return ids


def _from_llada_dict(d: dict) -> ModelConfig:
    unsupported = {
        "alibi": True, "include_bias": True, "include_qkv_bias": True, "attention_layer_norm": True,
        "scale_logits": True, "input_emb_norm": True, "bias_for_layer_norm": True,
    }
    for key, bad in unsupported.items():
        if d.get(key) == bad:
            raise ValueError(f"config.json sets {key}={bad}, which unmask's LLaDA model does not implement")
    if d.get("block_type", "llama") != "llama":
        raise ValueError(f"block_type {d['block_type']!r} is not supported (LLaDA uses 'llama')")
    if d.get("layer_norm_type", "rms") != "rms" or d.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise ValueError("only RMSNorm and SiLU-gated MLPs (the LLaDA configuration) are supported")
    vocab = d.get("embedding_size") or d["vocab_size"]
    n_heads = d["n_heads"]
    return ModelConfig(
        layout="llada",
        vocab_size=vocab,
        d_model=d["d_model"],
        n_layers=d["n_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("n_kv_heads") or (1 if d.get("multi_query_attention") else n_heads),
        mlp_hidden_size=d.get("mlp_hidden_size") or d["mlp_ratio"] * d["d_model"],
        max_seq_len=d.get("max_sequence_length", 4096),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=d.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(d.get("weight_tying", False)),
        **_special_ids("llada", d, vocab),
    )


def _from_lladamoe_dict(d: dict) -> ModelConfig:
    if d.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported by unmask's LLaDA-MoE model")
    if d.get("clip_qkv") is not None:
        raise ValueError("clip_qkv is not supported by unmask's LLaDA-MoE model")
    if d.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported; LLaDA-MoE checkpoints use plain RoPE")
    if d.get("partial_rotary_factor", 1) != 1:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if d.get("moe_router_score_function", "softmax") != "softmax":
        raise ValueError("only the softmax router (LLaDA-MoE's) is supported")
    n_layers = d["num_hidden_layers"]
    n_experts = d.get("num_experts", 0) or 0
    freq = d.get("moe_layer_freq", 1)
    if isinstance(freq, int):
        moe_layers = [n_experts > 0 and freq > 0 and i % freq == 0 for i in range(n_layers)]
    else:
        moe_layers = [bool(f) for f in freq]
    vocab = d["vocab_size"]
    return ModelConfig(
        layout="lladamoe",
        vocab_size=vocab,
        d_model=d["hidden_size"],
        n_layers=n_layers,
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        mlp_hidden_size=d.get("dense_intermediate_size") or d.get("intermediate_size") or 0,
        max_seq_len=d.get("max_position_embeddings", 4096),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        norm_eps=d.get("rms_norm_eps", 1e-5),
        qk_norm=bool(d.get("qk_layernorm", False)),
        n_experts=n_experts,
        experts_per_token=d.get("num_experts_per_tok", 0),
        expert_hidden_size=d.get("expert_intermediate_size", 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        shared_expert_hidden_size=d.get("shared_expert_intermediate_size"),
        expert_bias=bool(d.get("moe_router_enable_expert_bias", False)),
        moe_layers=moe_layers,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        **_special_ids("lladamoe", d, vocab),
    )


def _to_llada_dict(c: ModelConfig) -> dict:
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "mlp_hidden_size": c.mlp_hidden_size, "mlp_ratio": max(1, c.mlp_hidden_size // c.d_model),
        "vocab_size": c.vocab_size, "embedding_size": c.vocab_size, "max_sequence_length": c.max_seq_len,
        "rope": True, "rope_theta": c.rope_theta, "rope_full_precision": True, "rms_norm_eps": c.norm_eps,
        "weight_tying": c.tie_embeddings, "block_type": "llama", "layer_norm_type": "rms",
        "activation_type": "silu", "layer_norm_with_affine": True, "attention_layer_norm": False,
        "alibi": False, "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": False,
        "scale_logits": False, "input_emb_norm": False, "block_group_size": 1, "flash_attention": False,
        "multi_query_attention": None, "attention_dropout": 0.0, "residual_dropout": 0.0,
        "embedding_dropout": 0.0, "use_cache": False,
        "mask_token_id": c.mask_token_id, "eos_token_id": c.eos_token_id, "eot_token_id": c.eot_token_id,
        "pad_token_id": c.pad_token_id,
    }


def _to_lladamoe_dict(c: ModelConfig) -> dict:
    return {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "lladamoe",
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "dense_intermediate_size": c.mlp_hidden_size,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len, "rope_theta": c.rope_theta,
        "rope_scaling": None, "partial_rotary_factor": 1, "rms_norm_eps": c.norm_eps,
        "qk_layernorm": c.qk_norm, "num_experts": c.n_experts, "num_experts_per_tok": c.experts_per_token,
        "expert_intermediate_size": c.expert_hidden_size, "norm_topk_prob": c.norm_topk_prob,
        "shared_expert_intermediate_size": c.shared_expert_hidden_size,
        "moe_router_enable_expert_bias": c.expert_bias, "moe_router_score_function": "softmax",
        "moe_layer_freq": [int(m) for m in c.moe_layers], "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "use_cache": False, "mask_token_id": c.mask_token_id, "eos_token_id": c.eos_token_id,
        "eot_token_id": c.eot_token_id, "pad_token_id": c.pad_token_id,
    }


# Named presets: the public shapes (for benchmarks with random weights) and unmask's small models.
PRESETS: dict[str, ModelConfig] = {
    "llada-8b": ModelConfig(
        layout="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        mlp_hidden_size=12288, max_seq_len=4096, rope_theta=500000.0, mask_token_id=126336,
        eos_token_id=126081, eot_token_id=126348, pad_token_id=126081,
    ),
    "llada-moe-7b-a1b": ModelConfig(
        layout="lladamoe", vocab_size=157184, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
        mlp_hidden_size=8192, max_seq_len=8192, rope_theta=50000.0, qk_norm=True, n_experts=64,
        experts_per_token=8, expert_hidden_size=1024, mask_token_id=156895, eos_token_id=156892,
    ),
}
