"""Tensor parallelism on gloo processes: sharded logits and sharded decoding against one process.

Each check runs in N spawned processes that form a gloo group (`run_ranks`); every rank builds the
unsharded model too and compares with it, so the reference is the single-process model itself.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from unmask.cli import main
from unmask.likelihood import Request, score_requests
from unmask.models import MaskedDiffusionLM, load_config, load_model
from unmask.models.parallel import check_divisible, parallelize, tensor_parallel_plan
from unmask.sampling import OptionError, block_generate, generate, left_pad
from unmask.sampling.noise import forbid_tokens, propose_tokens

DATA = Path(__file__).parent / "data"
LAYOUTS = ["llada-dense-tiny", "lladamoe-tiny", "llada2-moe-tiny"]


def run_ranks(check, world: int, tmp_path: Path, *args) -> None:
    """Run check(mesh, *args) on `world` gloo processes; a failed assertion on any rank fails the test."""
    mp.spawn(_rank_main, args=(world, str(tmp_path / "rendezvous"), check, args), nprocs=world)


def _rank_main(rank: int, world: int, init_file: str, check, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        check(init_device_mesh("cpu", (world,)), *args)
    finally:
        dist.destroy_process_group()


def _inputs(cfg, seed: int = 0):
    """Random ids (3, 24) and a padding mask whose first row is padded."""
    ids = torch.randint(0, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids, mask


def _one_kv_head_model() -> MaskedDiffusionLM:
    """The LLaDA2 fixture's shape with a single KV head, random weights (the same on every rank)."""
    torch.manual_seed(0)
    model = MaskedDiffusionLM(load_config(DATA / "llada2-moe-tiny").with_(n_kv_heads=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model.eval()


def _fresh(name: str) -> MaskedDiffusionLM:
    return _one_kv_head_model() if name == "one-kv-head" else load_model(DATA / name)


def _check_logits(mesh, names):
    tp = mesh.size()
    for name in names:
        reference = _fresh(name)
        sharded = parallelize(_fresh(name), mesh)
        cfg = reference.config
        ids, mask = _inputs(cfg)
        with torch.no_grad():
            for kwargs in ({}, {"attention_mask": mask}):
                logits = sharded(ids, **kwargs).logits
                assert logits.to_local().shape[-1] == cfg.vocab_size // tp, "each rank holds its vocabulary columns"
                gap = (logits.full_tensor() - reference(ids, **kwargs).logits).abs().max().item()
                assert gap <= 1e-5, (name, tp, kwargs.keys(), gap)
        assert sharded.embed.weight.to_local().shape[0] == cfg.vocab_size // tp
        assert sharded.blocks[0].attn.n_heads == cfg.n_heads // tp
        requests = [Request([5, 17, 99, 42], [7, 260, 3]), Request([11], [12, 13, 14, 15])]
        for mode in ("mc", "chain"):
            scores = [score_requests(model, requests, cfg_scales=(0.0, 1.5), mode=mode, mc_num=8, batch_size=4,
                                     mask_id=cfg.vocab_size - 1)
                      for model in (reference, sharded)]
            for one, other in zip(*scores):
                for a, b in zip(one, other):
                    assert abs(a.value - b.value) <= 1e-5, (name, mode, a, b)


@pytest.mark.slow
def test_sharded_logits_and_scores_equal_one_process_for_every_layout(tmp_path):
    """The three fixture layouts, and one KV head on two ranks (replicated: each rank keeps it):
    logits, and likelihood scores with and without CFG (block by block for LLaDA2)."""
    run_ranks(_check_logits, 2, tmp_path, LAYOUTS + ["one-kv-head"])


# Sampler settings whose sharded decoding must give the one-process tokens exactly.
GENERATE_CASES = [
    dict(steps=16, gen_length=16, block_length=8),                                  # the exact sampler
    dict(steps=16, gen_length=16, block_length=8, cfg_scale=1.5),
    dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, cache="dual"),
    dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, cache="prefix", reuse_uncond=True),
    dict(gen_length=16, block_length=8, threshold=0.02, cache="dual"),
    dict(gen_length=16, block_length=8, threshold=0.02, cfg_scale=1.0, cache="dual", reuse_uncond=True),
    dict(steps=8, gen_length=16, block_length=16, temperature=0.8, remasking="margin"),
    dict(steps=8, gen_length=16, block_length=16, remasking="entropy", suppress_tokens=[3, 200], eos_last=True),
]


def _check_generate(mesh, name):
    reference = load_model(DATA / name)
    sharded = parallelize(load_model(DATA / name), mesh)
    prompt, mask = left_pad([[5, 17, 99, 42, 7, 260], [11, 12]], pad_id=reference.config.pad_token_id)
    for case in GENERATE_CASES:
        outputs = [generate(model, prompt, attention_mask=mask, generator=torch.Generator().manual_seed(1), **case)
                   for model in (reference, sharded)]
        assert torch.equal(*outputs), (case, outputs)


# LLaDA2 block decoding (temperature 0, the public rule): the schedule, CFG both ways, no cache.
BLOCK_CASES = [
    dict(gen_length=48, block_length=16, steps=8),
    dict(gen_length=48, block_length=16, steps=8, cfg_scale=1.0),
    dict(gen_length=48, block_length=16, steps=8, cfg_scale=1.0, reuse_uncond=True),
    dict(gen_length=32, block_length=16, steps=4, threshold=0.01, cache=False),
]


def _check_block_generate(mesh, name):
    reference = load_model(DATA / name)
    sharded = parallelize(load_model(DATA / name), mesh)
    prompt, mask = left_pad([[5, 17, 99, 42, 7, 260, 3, 9, 11, 70], [11, 12]], pad_id=reference.config.pad_token_id)
    for case in BLOCK_CASES:
        outputs = [block_generate(model, prompt, attention_mask=mask, **case) for model in (reference, sharded)]
        assert torch.equal(*outputs), (case, outputs)
    with pytest.raises(OptionError, match="temperature 0"):
        block_generate(sharded, prompt, attention_mask=mask, gen_length=16, block_length=16, temperature=0.5)


def _check_forbidden_tokens(mesh):
    """Suppressing each row's best token on the shards moves the proposal as on the full logits
    (7 columns: uneven shards, as DTensor chunks them)."""
    full = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    sharded = distribute_tensor(full.clone(), mesh, [Shard(2)])
    best = propose_tokens(full, 0).flatten()
    expected = forbid_tokens(full.clone(), best)
    assert torch.equal(forbid_tokens(sharded, best).full_tensor(), expected)
    assert torch.equal(propose_tokens(sharded, 0), propose_tokens(expected, 0))


def _check_both_samplers(mesh):
    _check_forbidden_tokens(mesh)
    _check_generate(mesh, "llada-dense-tiny")
    _check_block_generate(mesh, "llada2-moe-tiny")


@pytest.mark.slow
def test_sharded_generate_is_token_identical_to_one_process(tmp_path):
    """The LLaDA sampler's modes on the dense fixture, LLaDA2 block decoding on the LLaDA2 fixture."""
    run_ranks(_check_both_samplers, 2, tmp_path)


@pytest.mark.slow
def test_torchrun_generate_with_tp_prints_the_one_process_text(tiny_checkpoint, capsys):
    args = ["generate", "hello", "--model", str(tiny_checkpoint), "--gen-length", "16", "--steps", "16",
            "--block-length", "8", "--cfg-scale", "1"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "unmask",
                          *args, "--tp", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected   # rank 0 alone prints, and prints the same text


def test_tp_errors_say_what_to_change(tiny_checkpoint, capsys):
    for tp, message in (("2", "torchrun --nproc-per-node 2 -m unmask"), ("3", "does not divide"),
                        ("0", "positive integer")):
        assert main(["generate", "hi", "--model", str(tiny_checkpoint), "--tp", tp]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_checkpoint), "--tp", "2"]) == 2
    assert "give the prompt as an argument" in capsys.readouterr().err


def test_plan_shards_every_projection():
    """Each block's projections are in the plan, experts by their width, the shared expert left partial."""
    model = load_model(DATA / "llada2-moe-tiny")
    plan = tensor_parallel_plan(model)
    assert {"embed", "lm_head", "blocks.0.mlp.gate_up", "blocks.0.mlp.down", "blocks.1.mlp",
            "blocks.1.mlp.shared.gate_up", "blocks.2.mlp.shared.down", "blocks.2.attn.qkv", "blocks.2.attn.out"} <= set(plan)
    assert type(plan["blocks.1.mlp"]).__name__ == "ExpertWidthParallel"
    with pytest.raises(ValueError, match="KV heads"):
        check_divisible(model.config.with_(n_heads=24, n_kv_heads=6), 4)
