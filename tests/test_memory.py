"""The memory formula of `unmask train --dry-run` against steps measured on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from unmask.models import MaskedDiffusionLM, ModelConfig
from unmask.train.memory import Allocations, StepShape, estimate_step_memory, lora_parameters, measure_step_memory
from unmask.train.trainer import init_weights

torch.set_num_threads(1)

SHAPES = {
    "llada": ModelConfig(layout="llada", vocab_size=1024, d_model=128, n_layers=3, n_heads=4, n_kv_heads=4,
                         mlp_hidden_size=352, max_seq_len=256),
    "lladamoe": ModelConfig(layout="lladamoe", vocab_size=1024, d_model=128, n_layers=3, n_heads=4, n_kv_heads=4,
                            mlp_hidden_size=352, n_experts=8, experts_per_token=2, expert_hidden_size=64,
                            qk_norm=True, max_seq_len=256),
    "llada2_moe": ModelConfig(layout="llada2_moe", vocab_size=1024, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2,
                              head_dim=32, mlp_hidden_size=352, n_experts=8, experts_per_token=2,
                              expert_hidden_size=64, shared_expert_hidden_size=64, qk_norm=True,
                              partial_rotary_factor=0.5, router="sigmoid", expert_bias=True, norm_topk_prob=True,
                              moe_layers=[False, True, True], max_seq_len=512),
}


def measured(cfg: ModelConfig, shape: StepShape):
    from unmask.models.adapters import add_lora, lora_config

    torch.manual_seed(0)
    model = MaskedDiffusionLM(cfg)
    init_weights(model)
    model.train().gradient_checkpointing = shape.activation_checkpointing
    if shape.method == "lora":
        add_lora(model, lora_config(cfg, shape.lora_rank, 2.0 * shape.lora_rank, list(shape.lora_targets) or None))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return model, measure_step_memory(model, optimizer, shape, torch.device("cpu"))


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_the_estimate_is_within_10_percent_of_a_measured_step(layout, method):
    if method == "lora":
        pytest.importorskip("peft")
    cfg = SHAPES[layout]
    shape = StepShape(batch_size=2, seq_len=128, method=method, lora_rank=8,
                      block_length=32 if layout == "llada2_moe" else None)
    model, got = measured(cfg, shape)
    est = estimate_step_memory(cfg, shape)
    assert est.peak == pytest.approx(got.peak, rel=0.10)
    assert est.activations == pytest.approx(got.activations, rel=0.10)
    assert (est.weights, est.gradients, est.optimizer) == (got.weights, got.gradients, got.optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.gradients == 4 * trainable
    if method == "lora":  # the target: LoRA SFT within 1.3x of inference (the weights) + activations
        assert got.peak <= 1.3 * (got.weights + got.activations)


@pytest.mark.parametrize("layout", list(SHAPES))
def test_activation_checkpointing_is_estimated_within_10_percent(layout):
    pytest.importorskip("peft")
    cfg = SHAPES[layout]
    for method in ("full", "lora"):
        shape = StepShape(batch_size=2, seq_len=128, method=method, lora_rank=8, activation_checkpointing=True,
                          block_length=32 if layout == "llada2_moe" else None)
        _, got = measured(cfg, shape)
        est = estimate_step_memory(cfg, shape)
        assert est.peak == pytest.approx(got.peak, rel=0.10), method
        assert est.activations == pytest.approx(got.activations, rel=0.10), method
        assert est.peak < estimate_step_memory(cfg, replace(shape, activation_checkpointing=False)).peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_on_stacked_experts_counts_their_materialised_copies(checkpointing):
    pytest.importorskip("peft")
    cfg = SHAPES["lladamoe"]
    shape = StepShape(batch_size=2, seq_len=64, method="lora", lora_rank=4, activation_checkpointing=checkpointing,
                      lora_targets=("qkv", "out", "w_gate", "w_up", "w_down"))
    model, got = measured(cfg, shape)
    est = estimate_step_memory(cfg, shape)
    assert est.peak == pytest.approx(got.peak, rel=0.10)
    assert est.gradients == 4 * lora_parameters(cfg, 4, shape.lora_targets)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layout", ["llada", "llada2_moe"])
def test_an_int8_base_is_estimated_with_the_float_copies_autograd_keeps(layout, checkpointing):
    pytest.importorskip("peft")
    pytest.importorskip("torchao")
    from unmask.models import quantize_model

    cfg = SHAPES[layout]
    shape = StepShape(batch_size=2, seq_len=64, method="qlora", lora_rank=8, activation_checkpointing=checkpointing,
                      block_length=32 if layout == "llada2_moe" else None)
    def measured_int8():
        from unmask.models.adapters import add_lora, lora_config

        torch.manual_seed(0)
        model = MaskedDiffusionLM(cfg)
        init_weights(model)
        quantize_model(model.train(), "int8")
        model.gradient_checkpointing = checkpointing
        add_lora(model, lora_config(cfg, 8, 16.0))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return measure_step_memory(model, optimizer, shape, torch.device("cpu"))

    got, est = measured_int8(), estimate_step_memory(cfg, shape)
    assert est.weights == pytest.approx(got.weights, rel=0.01)
    assert est.peak == pytest.approx(got.peak, rel=0.10)
    lora = estimate_step_memory(cfg, replace(shape, method="lora"))
    assert est.weights < lora.weights
    with pytest.raises(ValueError, match="method"):
        StepShape(batch_size=1, seq_len=8, method="dora")


def test_allocations_count_what_is_allocated_and_freed():
    with Allocations(torch.device("cpu")) as a:
        x = torch.ones(1 << 18)                # 1 MiB
        y = torch.ones(1 << 18)
        del y
        end = a.mark()
        z = torch.ones(1 << 17)               # 0.5 MiB
    assert a.net_at(end) == 1 << 20 and a.peak == 2 << 20
    del x, z


def test_dry_run_prints_estimate_and_measurement_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    pytest.importorskip("peft")
    from unmask.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dry-run", "--init-from", str(tiny_checkpoint), "--lora", "--seq-len", "64",
                 "--batch-size", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LoRA rank 16" in text and "estimated / measured peak: 1.0" in text
    assert not out.exists()
    assert main(["train", "--dry-run", "--preset", "llada-8b", "--seq-len", "2048", "--batch-size", "1"]) == 0
    assert "not measured: it needs about" in capsys.readouterr().out
    assert main(["train", "--dry-run"]) == 2
    assert "--tokenizer DIR, --init-from DIR or --preset NAME" in capsys.readouterr().err
