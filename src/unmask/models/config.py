"""Model configuration: one dataclass for the three public LLaDA layouts.

The public checkpoints describe the same kind of network with three vocabularies of config keys:
LLaDA-8B, LLaDA 1.5 and iLLaDA use OLMo's (`d_model`, `n_layers`, `mlp_hidden_size`, ...), LLaDA-MoE
uses OLMoE's (`hidden_size`, `num_hidden_layers`, `num_experts`, ...) and LLaDA2 its own
(`num_experts`, `n_group`, `first_k_dense_replace`, ...). `ModelConfig` is the one shape unmask
works with; `from_hf_dict` / `to_hf_dict` translate, so a checkpoint written by unmask is read by
the public code and vice versa. A config.json key that unmask neither reads nor knows to be
harmless is refused by name (`_KNOWN_KEYS`): it could change the computation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

# Special ids of the public checkpoints, which their config.json files do not all record.
# Keyed by (layout, vocab_size). Source: the LLaDA / LLaDA-MoE model cards and tokenizer files.
KNOWN_SPECIAL_IDS = {
    ("llada", 126464): {"mask_token_id": 126336, "eos_token_id": 126081, "eot_token_id": 126348},
    ("lladamoe", 157184): {"mask_token_id": 156895, "eos_token_id": 156892, "eot_token_id": None},
    ("llada2_moe", 157184): {"mask_token_id": 156895, "eos_token_id": 156892, "eot_token_id": None},
}
LAYOUTS = ("llada", "lladamoe", "llada2_moe")

# Least value of each size: zero heads would divide by zero, a negative size fail deep in torch.
_LEAST = {"vocab_size": 1, "d_model": 1, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1, "head_dim": 1, "max_seq_len": 1,
          "mlp_hidden_size": 0, "n_experts": 0, "experts_per_token": 0, "expert_hidden_size": 0, "n_groups": 1,
          "topk_groups": 1}


@dataclass
class ModelConfig:
    """Shape and special ids of a bidirectional masked-diffusion transformer.

    `layout` names the checkpoint layout the weights are read from and written to: "llada" (dense,
    OLMo-style names), "lladamoe" (OLMoE-style names, optional experts) or "llada2_moe" (LLaDA2:
    fused q|k|v, explicit head_dim, partial RoPE, sigmoid group-limited routing, dense layers first).
    """

    layout: str = "llada"
    vocab_size: int = 384
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None  # None: d_model // n_heads (LLaDA2 states it; q is n_heads·head_dim wide)
    mlp_hidden_size: int = 160
    max_seq_len: int = 512
    rope_theta: float = 500000.0
    partial_rotary_factor: float = 1.0  # the leading fraction of each head's dims that RoPE rotates
    norm_eps: float = 1e-5
    qk_norm: bool = False
    # Mixture of experts (layouts "lladamoe", "llada2_moe"); n_experts == 0 means every layer is dense.
    n_experts: int = 0
    experts_per_token: int = 0
    expert_hidden_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_hidden_size: int | None = None
    expert_bias: bool = False
    router: str = "softmax"  # "softmax" (LLaDA-MoE) or "sigmoid" (LLaDA2); see MoE.route
    n_groups: int = 1        # group-limited routing: experts in n_groups contiguous groups,
    topk_groups: int = 1     # of which only the topk_groups best compete
    routed_scale: float = 1.0  # routed experts' combine weights are scaled by this
    moe_layers: list[bool] = field(default_factory=list)
    tie_embeddings: bool = False
    mask_token_id: int | None = 383
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}: use one of {', '.join(map(repr, LAYOUTS))}")
        for name, least in _LEAST.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} must give an even number of "
                             f"rotary dims between 2 and head_dim ({self.head_dim}), got {self.rotary_dim}")
        if not self.moe_layers:
            self.moe_layers = [self.n_experts > 0] * self.n_layers
        if len(self.moe_layers) != self.n_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        if any(self.moe_layers) and not (self.n_experts and self.experts_per_token and self.expert_hidden_size):
            raise ValueError("MoE layers need n_experts, experts_per_token and expert_hidden_size")
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) exceeds n_experts ({self.n_experts})")
        if self.router not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router {self.router!r}: use 'softmax' or 'sigmoid'")
        if any(self.moe_layers):
            _check_groups(self)
        for name, hf_name in (("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 ({hf_name} in config.json), got {value}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})")
        _check_expressible(self)

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (as the public code rounds it)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    # ---- Hugging Face config.json translation -------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a public config.json (any layout). Raises ValueError for unsupported features, values or keys."""
        model_type = d.get("model_type", "")
        if "d_model" in d:  # OLMo-style keys: LLaDA dense (LLaDA-8B, LLaDA 1.5, iLLaDA)
            layout = "llada"
        elif model_type == "llada2_moe":
            layout = "llada2_moe"
        elif "hidden_size" in d and model_type in ("lladamoe", "llada"):
            layout = "lladamoe"
        else:
            raise ValueError(
                f"unknown architecture (model_type {model_type!r}): unmask reads LLaDA ('llada', OLMo-style keys), "
                "LLaDA-MoE ('lladamoe') and LLaDA2 ('llada2_moe') checkpoints natively; for other models pass "
                "trust_remote_code=True (--trust-remote-code) to use the checkpoint's own modeling code"
            )
        _refuse_unknown_keys(d, layout)
        return _FROM_HF[layout](d)

    def to_hf_dict(self) -> dict:
        """config.json in this config's layout, readable by the public modeling code."""
        return _TO_HF[self.layout](self)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_groups(c: ModelConfig) -> None:
    """Group-limited routing must be well formed (as the public code would fail or misroute otherwise)."""
    if c.n_experts % c.n_groups:
        raise ValueError(f"n_experts ({c.n_experts}) must be a multiple of n_groups ({c.n_groups})")
    if c.topk_groups > c.n_groups:
        raise ValueError(f"topk_groups ({c.topk_groups}) exceeds n_groups ({c.n_groups})")
    group = c.n_experts // c.n_groups
    if c.topk_groups < c.n_groups and group < 2:
        raise ValueError("group-limited routing scores a group by its two best experts: each of the n_groups "
                         f"groups needs at least 2 experts, got {group}")
    if c.experts_per_token > c.topk_groups * group:
        raise ValueError(f"experts_per_token ({c.experts_per_token}) exceeds the {c.topk_groups * group} experts "
                         f"of the topk_groups ({c.topk_groups}) groups kept")


def _check_expressible(c: ModelConfig) -> None:
    """Refuse a config its layout's config.json cannot state, so a saved model reads back as it was."""
    if c.layout != "llada2_moe" and (c.head_dim * c.n_heads != c.d_model or c.partial_rotary_factor != 1):
        raise ValueError(f"layout {c.layout!r} has head_dim = d_model / n_heads and full RoPE; "
                         "an explicit head_dim or partial RoPE needs layout 'llada2_moe'")
    if c.layout == "llada" and (any(c.moe_layers) or c.qk_norm):
        raise ValueError("layout 'llada' has no experts and no q/k norm: use 'lladamoe' or 'llada2_moe'")
    if c.layout == "lladamoe" and (c.router != "softmax" or c.n_groups > 1 or c.routed_scale != 1):
        raise ValueError("layout 'lladamoe' routes by a softmax, without groups or scaling: use 'llada2_moe'")
    if c.layout == "llada2_moe":
        dense = _first_k_dense(c)
        if not all(c.moe_layers[dense:]):
            raise ValueError("layout 'llada2_moe' has its dense layers first, then MoE layers only "
                             f"(first_k_dense_replace), got moe_layers={c.moe_layers}")
        if dense < c.n_layers and (c.router != "sigmoid" or not c.expert_bias
                                   or c.norm_topk_prob != (c.experts_per_token > 1)):
            raise ValueError("layout 'llada2_moe' routes by sigmoid with an expert bias, renormalising the "
                             "weights when experts_per_token > 1")
        if dense < c.n_layers and (c.shared_expert_hidden_size or 0) % c.expert_hidden_size:
            raise ValueError(f"layout 'llada2_moe' has shared experts of the routed width ({c.expert_hidden_size}): "
                             f"shared_expert_hidden_size {c.shared_expert_hidden_size} is not a multiple of it")


def _first_k_dense(c: ModelConfig) -> int:
    return c.moe_layers.index(True) if any(c.moe_layers) else c.n_layers


# config.json keys each layout may hold: those its translation reads or checks, and those known not to
# change the forward pass (metadata, training and initialisation settings, options of a feature that is
# checked to be off). Any other key with a value is refused by name: a setting unmask does not know may
# change the computation, and a model that silently computes something else is worse than an error.
_METADATA = {"architectures", "model_type", "auto_map", "transformers_version", "torch_dtype", "dtype",
             "_name_or_path", "use_cache", "initializer_range", "attention_dropout", "embedding_dropout",
             "bos_token_id", "eos_token_id", "eot_token_id", "mask_token_id", "pad_token_id"}
_KNOWN_KEYS = {
    "llada": _METADATA | {
        "d_model", "n_layers", "n_heads", "n_kv_heads", "multi_query_attention", "mlp_hidden_size", "mlp_ratio",
        "vocab_size", "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps", "weight_tying",
        "alibi", "include_bias", "include_qkv_bias", "attention_layer_norm", "scale_logits", "input_emb_norm",
        "bias_for_layer_norm", "block_type", "layer_norm_type", "activation_type", "rope", "rope_full_precision",
        "layer_norm_with_affine",
        "alibi_bias_max", "attention_layer_norm_with_affine", "block_group_size", "flash_attention",
        "init_cutoff_factor", "init_device", "init_fn", "init_std", "precision", "residual_dropout"},
    "lladamoe": _METADATA | {
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "dense_intermediate_size",
        "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "qk_layernorm",
        "num_experts", "num_experts_per_tok", "expert_intermediate_size", "norm_topk_prob",
        "shared_expert_intermediate_size", "moe_router_enable_expert_bias", "moe_router_score_function",
        "moe_layer_freq", "tie_word_embeddings", "attention_bias", "clip_qkv", "rope_scaling",
        "partial_rotary_factor", "hidden_act",
        # in the public config, not read by the public LLaDA-MoE code
        "routed_scaling_factor", "router_num_group", "router_topk_group", "router_aux_loss_coef",
        "output_router_logits"},
    "llada2_moe": _METADATA | {
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_shared_experts",
        "n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "partial_rotary_factor",
        "rope_theta", "rms_norm_eps", "use_qk_norm", "tie_word_embeddings", "vocab_size", "max_position_embeddings",
        "use_qkv_bias", "use_bias", "norm_head", "use_sliding_window", "rope_scaling", "hidden_act",
        "score_function", "moe_router_enable_expert_bias", "norm_topk_prob", "rotary_dim", "router_dtype",
        "sliding_window", "max_window_layers", "output_dropout", "output_router_logits"},
}


def _refuse_unknown_keys(d: dict, layout: str) -> None:
    unknown = sorted(k for k, v in d.items() if k not in _KNOWN_KEYS[layout] and v is not None)
    if unknown:
        raise ValueError(
            f"unknown key(s) for the {layout!r} layout: {', '.join(unknown)}. unmask does not know what they change "
            "in the computation, so it does not guess: remove a key you know to be harmless, or pass "
            "trust_remote_code=True (--trust-remote-code) to use the checkpoint's own modeling code")


_REQUIRED = object()
_JSON_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _get(d: dict, key: str, kind: type, default=_REQUIRED):
    """config.json's `key`, checked to be of JSON type `kind` (an int is a float; a bool is not an int).

    Every value the translations read goes through here, so a wrong type is reported under the key the
    user has to change, before any arithmetic on it. null counts as absent (Hugging Face's convention):
    it gives the default, and is refused only for a key without one.
    """
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{key} is missing" if key not in d else f"{key} must be {_JSON_TYPES[kind]}, got null")
        return default
    if kind is float and type(value) is int:
        value = float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ValueError(f"{key} must be {_JSON_TYPES[kind]}, got {json.dumps(value)[:80]}")
    if kind is float and not math.isfinite(value):   # Python's JSON reads NaN and Infinity
        raise ValueError(f"{key} must be a finite number, got {value}")
    return value


def _special_ids(layout: str, d: dict, vocab_size: int) -> dict:
    known = KNOWN_SPECIAL_IDS.get((layout, vocab_size), {})
    return {name: _get(d, name, int, known.get(name))
            for name in ("mask_token_id", "eos_token_id", "eot_token_id", "pad_token_id")}


def _from_llada_dict(d: dict) -> ModelConfig:
    unsupported = {
        "alibi": True, "include_bias": True, "include_qkv_bias": True, "attention_layer_norm": True,
        "scale_logits": True, "input_emb_norm": True, "bias_for_layer_norm": True, "rope": False,
        "rope_full_precision": False, "layer_norm_with_affine": False,
    }
    for key, bad in unsupported.items():
        if d.get(key) == bad:
            raise ValueError(f"config.json sets {key}={bad}, which unmask's LLaDA model does not implement")
    if d.get("block_type", "llama") != "llama":
        raise ValueError(f"block_type {d['block_type']!r} is not supported (LLaDA uses 'llama')")
    if d.get("layer_norm_type", "rms") != "rms" or d.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise ValueError("only RMSNorm and SiLU-gated MLPs (the LLaDA configuration) are supported")
    vocab = _get(d, "vocab_size", int)
    vocab = _get(d, "embedding_size", int, None) or vocab  # the padded size the weights have
    d_model, n_heads = _get(d, "d_model", int), _get(d, "n_heads", int)
    mqa = _get(d, "multi_query_attention", bool, False)
    return ModelConfig(
        layout="llada",
        vocab_size=vocab,
        d_model=d_model,
        n_layers=_get(d, "n_layers", int),
        n_heads=n_heads,
        n_kv_heads=_get(d, "n_kv_heads", int, None) or (1 if mqa else n_heads),
        mlp_hidden_size=_get(d, "mlp_hidden_size", int, None) or _get(d, "mlp_ratio", int) * d_model,
        max_seq_len=_get(d, "max_sequence_length", int, 4096),
        rope_theta=_get(d, "rope_theta", float, 10000.0),
        norm_eps=_get(d, "rms_norm_eps", float, 1e-5),
        tie_embeddings=_get(d, "weight_tying", bool, False),
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
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (LLaDA-MoE uses 'silu')")
    n_layers = _get(d, "num_hidden_layers", int)
    n_experts = _get(d, "num_experts", int, 0)
    freq = d.get("moe_layer_freq")
    if isinstance(freq, list):
        if any(f not in (0, 1) for f in freq):
            raise ValueError(f"moe_layer_freq must be an integer or a list of 0/1 (one per layer), got {freq}")
        moe_layers = [bool(f) for f in freq]
    else:
        freq = _get(d, "moe_layer_freq", int, 1)
        moe_layers = [n_experts > 0 and freq > 0 and i % freq == 0 for i in range(n_layers)]
    vocab, n_heads = _get(d, "vocab_size", int), _get(d, "num_attention_heads", int)
    return ModelConfig(
        layout="lladamoe",
        vocab_size=vocab,
        d_model=_get(d, "hidden_size", int),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_get(d, "num_key_value_heads", int, None) or n_heads,
        mlp_hidden_size=_get(d, "dense_intermediate_size", int, None) or _get(d, "intermediate_size", int, 0),
        max_seq_len=_get(d, "max_position_embeddings", int, 4096),
        rope_theta=_get(d, "rope_theta", float, 10000.0),
        norm_eps=_get(d, "rms_norm_eps", float, 1e-5),
        qk_norm=_get(d, "qk_layernorm", bool, False),
        n_experts=n_experts,
        experts_per_token=_get(d, "num_experts_per_tok", int, 0),
        expert_hidden_size=_get(d, "expert_intermediate_size", int, 0),
        norm_topk_prob=_get(d, "norm_topk_prob", bool, False),
        shared_expert_hidden_size=_get(d, "shared_expert_intermediate_size", int, None),
        expert_bias=_get(d, "moe_router_enable_expert_bias", bool, False),
        moe_layers=moe_layers,
        tie_embeddings=_get(d, "tie_word_embeddings", bool, False),
        **_special_ids("lladamoe", d, vocab),
    )


def _from_llada2_dict(d: dict) -> ModelConfig:
    """LLaDA2's config.json. An absent key takes the public LLaDA2MoeConfig default, as the public code would."""
    refused = {"use_qkv_bias": (False, "q/k/v biases"), "use_bias": (True, "projection biases"),
               "norm_head": (False, "normalised lm_head"), "use_sliding_window": (False, "sliding-window attention")}
    for key, (default, what) in refused.items():
        if _get(d, key, bool, default):
            absent = " (true is the public default when the key is absent)" if key not in d else ""
            raise ValueError(f"{key}=true{absent}: unmask's LLaDA2 model has no {what}")
    if d.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported; LLaDA2 checkpoints use plain RoPE")
    for key, supported in (("hidden_act", "silu"), ("score_function", "sigmoid"), ("router_dtype", "fp32")):
        if _get(d, key, str, supported) != supported:
            raise ValueError(f"{key} {d[key]!r} is not supported: the public LLaDA2 code computes {supported!r}")
    n_layers, n_heads = _get(d, "num_hidden_layers", int), _get(d, "num_attention_heads", int)
    n_experts, top_k = _get(d, "num_experts", int, 16), _get(d, "num_experts_per_tok", int, 2)
    # The public code always adds the expert bias and renormalises (top-k > 1) whatever these keys say;
    # a config that says otherwise was meant for other code, so it is refused rather than guessed.
    if not _get(d, "moe_router_enable_expert_bias", bool, True):
        raise ValueError("moe_router_enable_expert_bias=false is not supported: the public LLaDA2 code always adds "
                         "the expert bias")
    if not _get(d, "norm_topk_prob", bool, True) and top_k > 1:
        raise ValueError("norm_topk_prob=false is not supported: the public LLaDA2 code always renormalises")
    expert_width = _get(d, "moe_intermediate_size", int, 0)
    first_dense = _get(d, "first_k_dense_replace", int, 0)
    vocab = _get(d, "vocab_size", int)
    cfg = ModelConfig(
        layout="llada2_moe",
        vocab_size=vocab,
        d_model=_get(d, "hidden_size", int),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_get(d, "num_key_value_heads", int, None) or n_heads,
        head_dim=_get(d, "head_dim", int, None),
        mlp_hidden_size=_get(d, "intermediate_size", int, 0),
        max_seq_len=_get(d, "max_position_embeddings", int, 16384),
        rope_theta=_get(d, "rope_theta", float, 10000.0),
        partial_rotary_factor=_get(d, "partial_rotary_factor", float, 0.5),
        norm_eps=_get(d, "rms_norm_eps", float, 1e-5),
        qk_norm=_get(d, "use_qk_norm", bool, True),
        n_experts=n_experts,
        experts_per_token=top_k,
        expert_hidden_size=expert_width,
        norm_topk_prob=top_k > 1,
        shared_expert_hidden_size=expert_width * _get(d, "num_shared_experts", int, 0) or None,
        expert_bias=True,
        router="sigmoid",
        n_groups=_get(d, "n_group", int, 8),
        topk_groups=_get(d, "topk_group", int, 4),
        routed_scale=_get(d, "routed_scaling_factor", float, 2.5),
        moe_layers=[n_experts > 0 and i >= first_dense for i in range(n_layers)],
        tie_embeddings=_get(d, "tie_word_embeddings", bool, False),
        **_special_ids("llada2_moe", d, vocab),
    )
    if _get(d, "rotary_dim", int, cfg.rotary_dim) != cfg.rotary_dim:
        raise ValueError(f"rotary_dim {d['rotary_dim']} disagrees with head_dim × partial_rotary_factor "
                         f"= {cfg.rotary_dim}, which the public code uses")
    return cfg


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


def _to_llada2_dict(c: ModelConfig) -> dict:
    return {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe",
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.mlp_hidden_size,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len, "rope_theta": c.rope_theta,
        "rope_scaling": None, "partial_rotary_factor": c.partial_rotary_factor, "rotary_dim": c.rotary_dim,
        "rms_norm_eps": c.norm_eps, "use_qk_norm": c.qk_norm, "use_qkv_bias": False, "use_bias": False,
        "norm_head": False, "hidden_act": "silu", "num_experts": c.n_experts,
        "num_experts_per_tok": c.experts_per_token, "moe_intermediate_size": c.expert_hidden_size,
        "num_shared_experts": (c.shared_expert_hidden_size or 0) // max(c.expert_hidden_size, 1),
        "n_group": c.n_groups, "topk_group": c.topk_groups, "routed_scaling_factor": c.routed_scale,
        "first_k_dense_replace": _first_k_dense(c), "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "norm_topk_prob": c.experts_per_token > 1,
        "tie_word_embeddings": c.tie_embeddings, "use_sliding_window": False, "use_cache": False,
        "mask_token_id": c.mask_token_id, "eos_token_id": c.eos_token_id, "eot_token_id": c.eot_token_id,
        "pad_token_id": c.pad_token_id,
    }


_FROM_HF = {"llada": _from_llada_dict, "lladamoe": _from_lladamoe_dict, "llada2_moe": _from_llada2_dict}
_TO_HF = {"llada": _to_llada_dict, "lladamoe": _to_lladamoe_dict, "llada2_moe": _to_llada2_dict}


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
    "llada2-mini": ModelConfig(
        layout="llada2_moe", vocab_size=157184, d_model=2048, n_layers=20, n_heads=16, n_kv_heads=4, head_dim=128,
        mlp_hidden_size=5120, max_seq_len=32768, rope_theta=600000.0, partial_rotary_factor=0.5, norm_eps=1e-6,
        qk_norm=True, n_experts=256, experts_per_token=8, expert_hidden_size=512, norm_topk_prob=True,
        shared_expert_hidden_size=512, expert_bias=True, router="sigmoid", n_groups=8, topk_groups=4,
        routed_scale=2.5, moe_layers=[False] + [True] * 19, mask_token_id=156895, eos_token_id=156892,
        pad_token_id=156892,
    ),
}
