"""8-bit weights (`quantize="int8"`, torchao weight-only) on the dense and MoE layouts, the CLI flag and its errors.

Tolerances were measured on the fixtures (random weights, |logit| <= 3) in float32 and bfloat16: mean
|logit error| <= 0.018, argmax agreement >= 0.94; the max error is 0.07 on the dense model but up
to 0.84 on the MoE ones, where a slightly moved hidden state can send a token to another expert.
"""

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

import unmask
from unmask.cli import main
from unmask.commands import bench as bench_command
from unmask.models import load_model, quantize_model, weight_bytes
from unmask.models.quantize import quantized_layers

DATA = Path(__file__).parent / "data"
FIXTURES = ["llada-dense-tiny", "lladamoe-tiny", "llada2-moe-tiny"]


def _int8(t) -> bool:
    return type(t).__name__ == "Int8Tensor" and t.qdata.dtype == torch.int8


@pytest.mark.parametrize("name", FIXTURES)
def test_linear_layers_hold_int8_weights(name):
    model = load_model(DATA / name)
    before = weight_bytes(model)
    quantize_model(model)
    layers = quantized_layers(model)
    assert "lm_head" in layers and any(n.endswith("attn.qkv") for n in layers)
    for n in layers:
        assert _int8(model.get_submodule(n).weight), n
    for n, p in model.named_parameters():   # routers, stacked experts, embedding, norms: unchanged
        if n.removesuffix(".weight") not in layers:
            assert p.dtype == torch.float32 and not _int8(p), n
    moe = [m for m in model.modules() if type(m).__name__ == "MoE"]
    assert bool(moe) == (name != "llada-dense-tiny")
    assert all(not _int8(m.router.weight) and not _int8(m.w_gate) for m in moe)
    assert weight_bytes(model) < before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FIXTURES)
def test_logits_stay_close(name, dtype):
    reference = load_model(DATA / name, dtype=dtype)
    quantized = load_model(DATA / name, dtype=dtype, quantize="int8")
    ids = torch.randint(0, reference.config.vocab_size - 5, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = reference(ids).logits.float(), quantized(ids).logits.float()
    error = (a - b).abs()
    assert error.mean() < 0.03 and (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert error.max() < (0.15 if name == "llada-dense-tiny" else 1.2)


def test_quantized_model_is_the_model_with_rounded_weights():
    """The only change is the weights' rounding: the float model given the dequantized weights agrees."""
    rounded, quantized = load_model(DATA / "llada-dense-tiny"), load_model(DATA / "llada-dense-tiny", quantize="int8")
    with torch.no_grad():
        for n in quantized_layers(quantized):
            rounded.get_submodule(n).weight.copy_(quantized.get_submodule(n).weight.dequantize())
        ids = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(quantized(ids).logits, rounded(ids).logits, atol=1e-4, rtol=1e-4)


def test_token_agreement_at_temperature_zero_on_the_bundled_model():
    model, tokenizer = unmask.load()
    quantized = quantize_model(copy.deepcopy(model))
    prompts = ["Mira Holt lives in", "Sam Price works at the", "The river runs past", "Who lives in Oakridge?"]
    ids, mask = unmask.left_pad([tokenizer(p).input_ids for p in prompts], model.config.pad_token_id)
    kw = dict(attention_mask=mask, steps=16, gen_length=16, block_length=16, temperature=0.0)
    a, b = unmask.generate(model, ids, **kw), unmask.generate(quantized, ids, **kw)
    assert (a == b).float().mean() >= 0.9   # measured: 1.0


@pytest.mark.slow
def test_generate_flag_end_to_end_without_torchao_noise():
    r = subprocess.run([sys.executable, "-m", "unmask.cli", "generate", "--quantize", "int8", "--gen-length", "8",
                        "x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("x") and "Failed to load" not in r.stderr and "KernelPreference" not in r.stderr


@pytest.mark.parametrize("command", [["generate", "x"], ["chat"], ["eval"], ["bench"], ["serve", "--port", "0"]])
def test_bad_value_is_one_line_before_the_load(command, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --quantize was checked")

    monkeypatch.setattr(unmask, "load", no_load)
    monkeypatch.setattr(bench_command, "load_bench_model", no_load)
    assert main([*command, "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown quantize mode 'int4'" in err


def test_missing_torchao_is_one_line(capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    assert main(["generate", "x", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "unmask[quant]"' in err
    with pytest.raises(ValueError, match="needs torchao"):
        load_model(DATA / "llada-dense-tiny", quantize="int8")


def test_library_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown quantize mode"):
        load_model(DATA / "llada-dense-tiny", quantize="int4")
    model = load_model(DATA / "llada-dense-tiny")
    assert quantize_model(model, None) is model and not _int8(model.lm_head.weight)


def test_bench_reports_the_quantization_error(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_command.register(parser.add_subparsers())
    args = parser.parse_args(["bench", "--shape", "tiny", "--quantize", "int8", "--batch-sizes", "1", "--prompt-len",
                              "6", "--gen-length", "8", "--block-length", "8", "--repeats", "1", "--device", "cpu",
                              "--modes", "exact", "--json", str(tmp_path / "b.json"),
                              "--markdown", str(tmp_path / "b.md")])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    meta, error = result["meta"], result["meta"]["quantization_error"]
    assert meta["quantize"] == "int8" and error["weight_bytes"] < error["reference_weight_bytes"]
    assert 0 < error["mean_logit_error"] <= error["max_logit_error"] and 0 <= error["token_agreement"] <= 1
    assert [r["agreement"] for r in result["rows"]] == [1.0, 1.0]   # the modes run on the quantized model
    assert "quantize=int8" in (tmp_path / "b.md").read_text() and "int8 vs float32 weights" in capsys.readouterr().out
