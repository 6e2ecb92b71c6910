"""Native models against the public code's logits, loading and saving, clear checkpoint errors."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import unmask
from unmask.models import (CheckpointError, KVCache, MaskedDiffusionLM, ModelConfig, load_config, load_model,
                           save_model)
from unmask.models.transformer import MoE

DATA = Path(__file__).parent / "data"
FIXTURES = ["llada-dense-tiny", "lladamoe-tiny"]


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_public_code(name):
    model = load_model(DATA / name)
    reference = torch.load(DATA / name / "reference_logits.pt")
    for case, ref in reference.items():
        logits = model(ref["input_ids"]).logits
        assert (logits - ref["logits"]).abs().max().item() <= 1e-4, case


def test_configs_read_both_layouts():
    dense, moe = load_config(DATA / "llada-dense-tiny"), load_config(DATA / "lladamoe-tiny")
    assert (dense.layout, dense.mask_token_id, dense.eos_token_id, dense.qk_norm) == ("llada", 383, 381, False)
    assert (moe.layout, moe.n_experts, moe.experts_per_token, moe.qk_norm) == ("lladamoe", 8, 2, True)
    assert moe.mask_token_id is None  # the public MoE config records none; callers pass mask_id


@pytest.mark.parametrize("name", FIXTURES)
def test_save_roundtrip_is_readable_and_identical(name, tmp_path):
    model = load_model(DATA / name)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    ids = torch.load(DATA / name / "reference_logits.pt")["batch"]["input_ids"]
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == json.loads(
        (DATA / name / "config.json").read_text())["model_type"]


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(DATA / "llada-dense-tiny" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(DATA / "llada-dense-tiny" / "config.json", tmp_path)
    ids = torch.arange(20).view(1, -1)
    assert torch.equal(load_model(tmp_path)(ids).logits, load_model(DATA / "llada-dense-tiny")(ids).logits)


def test_bfloat16_load():
    model = load_model(DATA / "llada-dense-tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model(torch.arange(8).view(1, -1)).logits.dtype == torch.bfloat16


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)
    shutil.copy(DATA / "llada-dense-tiny" / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)
    data = (DATA / "llada-dense-tiny" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(CheckpointError, match="trust-remote-code"):
        load_model(tmp_path)


def test_mismatched_config_is_refused(tmp_path):
    shutil.copy(DATA / "llada-dense-tiny" / "model.safetensors", tmp_path)
    cfg = json.loads((DATA / "llada-dense-tiny" / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        load_model(tmp_path)


def test_padding_is_never_attended():
    """A left-padded row gives the same logits as the unpadded sequence, whatever the pad ids are."""
    model = load_model(DATA / "llada-dense-tiny", dtype=torch.float64)
    ids = torch.randint(0, 380, (1, 10))
    alone = model(ids).logits
    for pad in (0, 7, 381):
        padded = torch.cat([torch.full((1, 5), pad), ids], 1)
        mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], 1).long()
        out = model(padded, attention_mask=mask).logits[:, 5:]
        assert torch.allclose(out, alone, atol=1e-10)


def test_gqa_runs_and_differs_from_mha_shape():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                      mask_token_id=49)
    model = MaskedDiffusionLM(cfg)
    assert model.blocks[0].attn.qkv.weight.shape == (32 + 2 * 16, 32)
    assert model(torch.arange(10).view(1, -1)).logits.shape == (1, 10, 50)


def test_grouped_experts_equal_a_per_token_loop():
    torch.manual_seed(0)
    cfg = ModelConfig(layout="lladamoe", vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                      mlp_hidden_size=0, n_experts=4, experts_per_token=2, expert_hidden_size=8,
                      norm_topk_prob=True, shared_expert_hidden_size=8, mask_token_id=49)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    out = moe(x)
    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            probs = torch.softmax(moe.router(x[b, t]), -1)
            w, e = probs.topk(2)
            w = w / w.sum()
            for weight, expert in zip(w, e):
                h = torch.nn.functional.silu(moe.w_gate[expert] @ x[b, t]) * (moe.w_up[expert] @ x[b, t])
                expected[b, t] += weight * (moe.w_down[expert] @ h)
            expected[b, t] += moe.shared(x[b, t])
    assert torch.allclose(out, expected, atol=1e-5)


def test_kv_cache_slice_equals_full_forward():
    model = load_model(DATA / "llada-dense-tiny")
    x = torch.randint(0, 380, (2, 24))
    full = model(x).logits
    cache = KVCache(len(model.blocks))
    assert torch.allclose(model(x, kv_cache=cache).logits, full, atol=1e-6)
    sliced = model(x[:, 8:16], kv_cache=cache, cache_start=8).logits
    assert torch.allclose(sliced, full[:, 8:16], atol=1e-5)


def test_logits_slice():
    model = load_model(DATA / "llada-dense-tiny")
    x = torch.randint(0, 380, (1, 16))
    assert torch.allclose(model(x, logits_slice=slice(4, 9)).logits, model(x).logits[:, 4:9], atol=1e-6)


def test_kv_cache_writes_by_column_tensor_as_by_slice():
    model = MaskedDiffusionLM(ModelConfig()).double().eval()
    x = torch.randint(0, 380, (2, 16), generator=torch.Generator().manual_seed(0))
    by_slice, by_tensor = KVCache(len(model.blocks)), KVCache(len(model.blocks))
    for cache in (by_slice, by_tensor):
        model(x, kv_cache=cache)
    y = torch.randint(0, 380, (2, 4))
    a = model(y, kv_cache=by_slice, cache_start=8).logits
    b = model(y, kv_cache=by_tensor, cache_start=torch.tensor(8)).logits
    assert torch.equal(a, b) and all(torch.equal(k, j) for k, j in zip(by_slice.keys, by_tensor.keys))
    copy = KVCache(len(model.blocks))
    copy.copy_rows(by_tensor, torch.tensor([1]))
    storage = copy.keys[0].data_ptr()
    copy.copy_rows(by_tensor, torch.tensor([0]))  # same shape: written in place
    assert copy.keys[0].data_ptr() == storage and torch.equal(copy.values[-1], by_tensor.values[-1][:1])


def test_grouped_matmul_equals_a_loop_over_experts():
    from unmask.models.transformer import grouped_matmul

    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(10, 16, generator=g, dtype=torch.float64), torch.randn(4, 8, 16, generator=g, dtype=torch.float64)
    counts = torch.tensor([3, 0, 6, 1], dtype=torch.int32)
    expected = torch.cat([x[:3] @ weight[0].T, x[3:9] @ weight[2].T, x[9:] @ weight[3].T])
    torch.testing.assert_close(grouped_matmul(x, weight, counts), expected)  # float64: the loop
    with torch.no_grad():  # float32 without autograd: one grouped kernel
        torch.testing.assert_close(grouped_matmul(x.float(), weight.float(), counts), expected.float())


# ---- iLLaDA / LLaDA 1.5: the dense layout with GQA, tied embeddings and a config-given mask id ------

def dense_reference(config: dict, w: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA (OLMo-layout) logits in float64 from config.json and the tensors by their public names."""
    w = {k: v.double() for k, v in w.items()}
    H, KV, d = config["n_heads"], config["n_kv_heads"], config["d_model"]
    D, (B, L) = d // H, ids.shape
    angles = torch.arange(L).double()[:, None] * config["rope_theta"] ** (-torch.arange(0, D, 2).double() / D)

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])

    def rope(t):
        a, b = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], dim=-1)

    t = "model.transformer."
    x = w[t + "wte.weight"][ids]
    for i in range(config["n_layers"]):
        b = f"{t}blocks.{i}."
        h = rms(x, w[b + "attn_norm.weight"])
        q, k, v = ((h @ w[b + name].T).view(B, L, -1, D).transpose(1, 2)
                   for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"))
        q, k, v = rope(q), rope(k).repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        attended = ((q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
        x = x + attended @ w[b + "attn_out.weight"].T
        h = rms(x, w[b + "ff_norm.weight"])
        x = x + (F.silu(h @ w[b + "ff_proj.weight"].T) * (h @ w[b + "up_proj.weight"].T)) @ w[b + "ff_out.weight"].T
    head = w[t + "wte.weight"] if config["weight_tying"] else w[t + "ff_out.weight"]
    return rms(x, w[t + "ln_f.weight"]) @ head.T


def test_dense_reference_matches_public_code():
    """The float64 reference below is itself right: it reproduces the public LLaDA code's logits."""
    config = json.loads((DATA / "llada-dense-tiny" / "config.json").read_text())
    weights = load_file(DATA / "llada-dense-tiny" / "model.safetensors")
    for case, ref in torch.load(DATA / "llada-dense-tiny" / "reference_logits.pt").items():
        assert (dense_reference(config, weights, ref["input_ids"]) - ref["logits"]).abs().max().item() <= 1e-5, case


def test_illada_like_checkpoint_gqa_tied_embeddings_config_mask_id(tmp_path):
    """iLLaDA's shape in little: 4 query heads on 2 kv heads, the lm head tied to the embedding, mask id 5."""
    public = {**json.loads((DATA / "llada-dense-tiny" / "config.json").read_text()),
              "n_kv_heads": 2, "weight_tying": True, "mask_token_id": 5}
    model = MaskedDiffusionLM(ModelConfig.from_hf_dict(public))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.08 * torch.randn(p.shape, generator=g))
    save_model(model, tmp_path)
    config, weights = json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")
    assert (config["n_kv_heads"], config["weight_tying"], config["mask_token_id"]) == (2, True, 5)
    assert "model.transformer.ff_out.weight" not in weights  # a tied checkpoint has no separate head

    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight and loaded.config.mask_token_id == 5
    ids = torch.randint(0, 384, (2, 20), generator=g)
    with torch.no_grad():
        logits = loaded(ids).logits
        assert (logits.double() - dense_reference(config, weights, ids)).abs().max().item() <= 1e-4
        untied = MaskedDiffusionLM(loaded.config.with_(tie_embeddings=False)).eval()
        untied.load_state_dict({**loaded.state_dict(), "lm_head.weight": loaded.embed.weight.clone()})
        assert torch.equal(untied(ids).logits, logits)
    kw = dict(steps=4, gen_length=8, block_length=8)
    out = unmask.generate(loaded, ids[:1, :6], **kw)
    assert out.shape == (1, 14) and torch.equal(out, unmask.generate(loaded, ids[:1, :6], mask_id=5, **kw))
    assert not (out[:, 6:] == 5).all()


def test_a_config_given_mask_id_wins_over_the_known_ids():
    public = {**json.loads((DATA / "llada-dense-tiny" / "config.json").read_text()),
              "vocab_size": 126464, "embedding_size": 126464}
    del public["mask_token_id"]
    assert ModelConfig.from_hf_dict(public).mask_token_id == 126336  # LLaDA-8B's, which its config omits
    assert ModelConfig.from_hf_dict({**public, "mask_token_id": 5}).mask_token_id == 5


@pytest.mark.parametrize("name, key, value", [
    ("llada-dense-tiny", "clip_qkv", 8.0),  # OLMo's clamp of q/k/v, which unmask does not do
    ("llada-dense-tiny", "quantization_config", {"quant_method": "fp8"}),
    ("lladamoe-tiny", "sliding_window", 128),
])
def test_unknown_config_keys_are_refused_by_name(tmp_path, name, key, value):
    d = tmp_path / "ckpt"
    shutil.copytree(DATA / name, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert key in str(e.value) and str(d / "config.json") in str(e.value) and "unknown key" in str(e.value)


def test_harmless_and_null_keys_are_accepted(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(DATA / "llada-dense-tiny", d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "clip_qkv": None, "init_std": 0.5, "torch_dtype": "bfloat16",
                                               "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}}))
    assert load_config(d) == load_config(DATA / "llada-dense-tiny")
