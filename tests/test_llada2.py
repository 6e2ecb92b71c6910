"""LLaDA2 (`llada2_moe`) natively: the public code's logits and generate outputs, save/load, and
held-out variants of the layout against an independent float64 implementation of its description."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from block_reference import reference_block_generate
from unmask.models import CheckpointError, MaskedDiffusionLM, ModelConfig, load_config, load_model, save_model
from unmask.sampling.blocks import block_generate

FIXTURE = Path(__file__).parent / "data" / "llada2-moe-tiny"
REFERENCE = torch.load(FIXTURE / "reference.pt")["cases"]
LOGITS_CASES = [name for name, case in REFERENCE.items() if case.get("kind") != "generate"]
GENERATE_CASES = [name for name, case in REFERENCE.items() if case.get("kind") == "generate"]
# Each mask a caller may pass for the same attention: additive float32 (what the references passed, or
# None), boolean, and the additive bfloat16 (1, 1, L, L) mask exactly as the public generate builds it.
MASKED_CASES = [(name, mask) for name in LOGITS_CASES
                for mask in ("attention_mask", "attention_mask_bool", "attention_mask_as_built_bf16")
                if mask in REFERENCE[name]]


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE)


def test_config_reads_the_layout():
    cfg = load_config(FIXTURE)
    assert (cfg.layout, cfg.head_dim, cfg.rotary_dim, cfg.n_kv_heads) == ("llada2_moe", 16, 8, 2)
    assert (cfg.router, cfg.n_groups, cfg.topk_groups, cfg.routed_scale) == ("sigmoid", 4, 2, 2.5)
    assert cfg.expert_bias and cfg.norm_topk_prob
    assert cfg.moe_layers == [False, True, True] and cfg.shared_expert_hidden_size == 32
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (511, 509, 510)


@pytest.mark.parametrize("name, mask", MASKED_CASES)
def test_logits_match_public_code(model, name, mask):
    case = REFERENCE[name]
    with torch.no_grad():
        logits = model(case["input_ids"], attention_mask=case[mask], position_ids=case["position_ids"]).logits
    assert (logits - case["logits"]).abs().max().item() <= 1e-4


def test_save_roundtrip_is_identical_and_in_the_public_layout(model, tmp_path):
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    case = REFERENCE["with_masks"]
    with torch.no_grad():
        kw = dict(attention_mask=case["attention_mask"], position_ids=case["position_ids"])
        assert torch.equal(model(case["input_ids"], **kw).logits, again(case["input_ids"], **kw).logits)
    public, written = (json.loads((d / "config.json").read_text()) for d in (FIXTURE, tmp_path))
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                "num_shared_experts", "n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace",
                "partial_rotary_factor", "rotary_dim", "rope_theta", "rms_norm_eps", "use_qk_norm", "use_bias",
                "use_qkv_bias", "score_function", "tie_word_embeddings", "vocab_size", "mask_token_id",
                "eos_token_id", "pad_token_id"):
        assert written[key] == public[key], key
    with safe_open(FIXTURE / "model.safetensors", "pt") as a, safe_open(tmp_path / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("name", GENERATE_CASES)
def test_generate_reproduces_the_public_algorithm(model, name, cache):
    case = REFERENCE[name]
    out = block_generate(model, case["inputs"], cache=cache, return_dict_in_generate=True, **case["kwargs"])
    n = case["output_ids"].shape[1]
    assert out.sequences.shape == (1, case["inputs"].shape[1] + case["kwargs"]["gen_length"])
    assert torch.equal(out.sequences[:, :n], case["output_ids"])
    assert (out.sequences[0, n:] == case["kwargs"]["eos_id"]).all()
    assert out.forward_passes == case["nfe"]


@pytest.mark.parametrize("name", GENERATE_CASES)
def test_the_plain_reference_reproduces_the_public_algorithm(model, name):
    case = REFERENCE[name]
    kwargs = {k: v for k, v in case["kwargs"].items() if k not in ("temperature", "top_k", "top_p")}
    assert case["kwargs"]["temperature"] == 0 and case["kwargs"]["top_k"] is None and case["kwargs"]["top_p"] is None
    ids, calls = reference_block_generate(model, case["inputs"], **kwargs)
    assert torch.equal(ids, case["output_ids"]) and calls == case["nfe"]


# ---- an independent implementation, written from the layout's description (fixture README) -------

def reference_forward(config: dict, w: dict, ids: torch.Tensor, mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA2 logits in float64 from config.json and the tensors by their public names; a loop per token
    for the router. mask: boolean (B|1, 1, L, L), True = may attend."""
    w = {k: v.double() for k, v in w.items()}
    H, KV, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    rot, eps = int(D * config["partial_rotary_factor"]), config["rms_norm_eps"]
    B, L = ids.shape
    positions = torch.arange(L)[None] if positions is None else positions
    angles = positions.double()[..., None] * config["rope_theta"] ** (-torch.arange(0, rot, 2).double() / rot)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (B|1, 1, L, rot/2)

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rope(t):  # dim j pairs with j + rot/2 among the first rot dims; the rest pass through
        a, b = t[..., :rot // 2], t[..., rot // 2:rot]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, t[..., rot:]], dim=-1)

    def swiglu(x, prefix):
        return (F.silu(x @ w[prefix + "gate_proj.weight"].T) * (x @ w[prefix + "up_proj.weight"].T)) @ w[
            prefix + "down_proj.weight"].T

    def moe(h, prefix):  # h: (hidden,)
        s = torch.sigmoid(w[prefix + "gate.weight"] @ h)
        biased = s + w[prefix + "gate.expert_bias"]
        groups = biased.view(config["n_group"], -1)
        group_scores = groups.sort(descending=True).values[:, :2].sum(-1)
        kept = group_scores.argsort(descending=True)[:config["topk_group"]]
        candidates = [e for e in range(len(s)) if e // groups.shape[1] in kept.tolist()]
        chosen = sorted(candidates, key=lambda e: -biased[e].item())[:config["num_experts_per_tok"]]
        weights = s[chosen] / (s[chosen].sum() if len(chosen) > 1 else 1) * config["routed_scaling_factor"]
        out = sum(wt * swiglu(h, f"{prefix}experts.{e}.") for wt, e in zip(weights, chosen))
        return out + swiglu(h, prefix + "shared_experts.") if config["num_shared_experts"] else out

    x = w["model.word_embeddings.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k, v = (rms(x, w[p + "input_layernorm.weight"]) @ w[p + "attention.query_key_value.weight"].T).split(
            [H * D, KV * D, KV * D], dim=-1)
        q, k, v = (t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v))
        if config["use_qk_norm"]:
            q, k = rms(q, w[p + "attention.query_layernorm.weight"]), rms(k, w[p + "attention.key_layernorm.weight"])
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H * D)
        x = x + attended @ w[p + "attention.dense.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        if i < config["first_k_dense_replace"]:
            x = x + swiglu(h, p + "mlp.")
        else:
            x = x + torch.stack([torch.stack([moe(h[b, t], p + "mlp.") for t in range(L)]) for b in range(B)])
    head = w["model.word_embeddings.weight" if config["tie_word_embeddings"] else "lm_head.weight"]
    return rms(x, w["model.norm.weight"]) @ head.T


def test_the_independent_implementation_matches_the_public_code():
    """The float64 reference is itself right: it reproduces the fixture's logits."""
    config, weights = json.loads((FIXTURE / "config.json").read_text()), load_file(FIXTURE / "model.safetensors")
    for name in LOGITS_CASES:
        case = REFERENCE[name]
        logits = reference_forward(config, weights, case["input_ids"], case.get("attention_mask_bool"),
                                   case["position_ids"])
        assert (logits - case["logits"]).abs().max().item() <= 1e-5, name


HELD_OUT = {
    # the held-out shape the issue names: one group (no group limit), no shared expert, full RoPE
    "one_group_no_shared_full_rope": dict(n_group=1, topk_group=1, num_shared_experts=0, partial_rotary_factor=1.0,
                                          first_k_dense_replace=0, num_experts_per_tok=2),
    # a head width other than hidden / heads, tied embeddings, top-1 routing (not renormalised), 2 shared experts
    "wide_heads_top1_tied": dict(hidden_size=48, head_dim=16, partial_rotary_factor=0.25, n_group=4, topk_group=1,
                                 num_experts_per_tok=1, num_shared_experts=2, first_k_dense_replace=2,
                                 tie_word_embeddings=True),
    # 8 groups of 2, the best 3 compete for 4 experts
    "many_groups": dict(n_group=8, topk_group=3, num_experts_per_tok=4, routed_scaling_factor=1.5),
}


def random_checkpoint(directory: Path, **changes) -> dict:
    """A checkpoint of the fixture's config with `changes` and random weights drawn as the fixture's, written
    by unmask; returns its config.json."""
    config = {**json.loads((FIXTURE / "config.json").read_text()), **changes}
    config.pop("rotary_dim")
    model = MaskedDiffusionLM(ModelConfig.from_hf_dict(config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_((0.1 if name.endswith("expert_bias") else 0.08) * torch.randn(t.shape, generator=g))
    save_model(model, directory)
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("variant", HELD_OUT)
def test_held_out_variants_match_the_independent_implementation(variant, tmp_path):
    config = random_checkpoint(tmp_path, **HELD_OUT[variant])
    for key, value in HELD_OUT[variant].items():
        assert config[key] == value, key
    weights = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in weights) != config["tie_word_embeddings"]
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    block = torch.arange(24) // 8
    allowed = (block[None, :] <= block[:, None])[None, None]
    positions = torch.arange(24)[None]
    for mask in (None, allowed, torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))):
        expected = reference_forward(config, weights, ids, None if mask is None else allowed, positions)
        for dtype in (torch.float64, torch.float32):  # float64 still runs norms, RoPE and router in float32
            with torch.no_grad():
                logits = load_model(tmp_path, dtype=dtype)(ids, attention_mask=mask, position_ids=positions).logits
            assert (logits.double() - expected).abs().max().item() <= (1e-5 if dtype == torch.float64 else 1e-4)


# ---- config.json values unmask does not implement are refused, naming the key and the file ----------

@pytest.mark.parametrize("changes, words", [
    ({"use_qkv_bias": True}, ["use_qkv_bias=true"]),
    ({"use_bias": None}, ["use_bias=true", "public default"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling"]),
    ({"score_function": "softmax"}, ["score_function", "softmax"]),
    ({"norm_topk_prob": False}, ["norm_topk_prob=false"]),
    ({"moe_router_enable_expert_bias": False}, ["moe_router_enable_expert_bias=false"]),
    ({"rotary_dim": 16}, ["rotary_dim 16", "= 8"]),
    ({"use_sliding_window": True}, ["use_sliding_window=true"]),
    ({"n_group": 3}, ["n_experts (16) must be a multiple of n_groups (3)"]),
    ({"use_linear_attention": True}, ["unknown key(s)", "use_linear_attention"]),
    ({"num_experts_per_tok": "4"}, ['num_experts_per_tok must be an integer, got "4"']),
])
def test_unsupported_config_values_are_refused(tmp_path, changes, words):
    shutil.copytree(FIXTURE, tmp_path / "ckpt", ignore=shutil.ignore_patterns("reference.pt"))
    config = {**json.loads((FIXTURE / "config.json").read_text()), **changes}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ckpt")
    for w in [str(tmp_path / "ckpt" / "config.json"), *words]:
        assert w in str(e.value)
