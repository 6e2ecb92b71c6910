"""Tensor parallelism on gloo processes: sharded logits and sharded decoding against one process.

Each check runs in N spawned processes that form a gloo group (`run_ranks`); every rank builds the
unsharded model too and compares with it, so the reference is the single-process model itself.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from unmask.cli import main
from unmask.likelihood import Request, score_requests
from unmask.models import MaskedDiffusionLM, ModelConfig, load_config, load_model, save_model
from unmask.models.layouts import placements
from unmask.models.parallel import check_divisible, parallelize, tensor_parallel_plan
from unmask.models.slices import SliceReader
from unmask.sampling import block_generate, generate, left_pad
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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _check_logits(mesh, checkpoints):
    """Each checkpoint loaded rank by rank (`load_model(mesh=...)`): the same shards as sharding the
    full model, and logits and scores equal to the one-process model's."""
    tp = mesh.size()
    for path in checkpoints:
        name = Path(path).name
        reference = load_model(path)
        sharded = load_model(path, mesh=mesh)
        whole_then_sharded = parallelize(load_model(path), mesh)
        theirs = whole_then_sharded.state_dict()
        for key, mine in sharded.state_dict().items():
            assert torch.equal(_local(mine), _local(theirs[key])), (name, key)
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
    save_model(_one_kv_head_model(), tmp_path / "one-kv-head")
    run_ranks(_check_logits, 2, tmp_path, [DATA / name for name in LAYOUTS] + [tmp_path / "one-kv-head"])


def _write_random_checkpoint(d: Path, cfg: ModelConfig, files: int) -> int:
    """A checkpoint of random weights (std 0.02) split over `files` safetensors shards with an index,
    written tensor by tensor without building the model; returns its weight bytes."""
    with torch.device("meta"):
        shapes = MaskedDiffusionLM(cfg)
    table = placements(cfg)
    generator, shards, weight_map = torch.Generator().manual_seed(0), [{} for _ in range(files)], {}
    for i, p in enumerate(table):
        shape = shapes.get_parameter(p.param_name)[p.index].shape
        shards[i * files // len(table)][p.checkpoint_name] = torch.randn(shape, generator=generator) * 0.02
    d.mkdir()
    for n, tensors in enumerate(shards):
        save_file(tensors, d / f"model-{n}.safetensors")
        weight_map.update(dict.fromkeys(tensors, f"model-{n}.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(t.nbytes for tensors in shards for t in tensors.values())


def _memory_kib(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0])


def _check_load_memory(mesh, path, weight_bytes):
    load_model(DATA / "llada-dense-tiny", mesh=mesh)   # imports and dispatch caches: not the checkpoint's cost
    Path("/proc/self/clear_refs").write_text("5")     # the peak (VmHWM) starts again from the current RSS
    before = _memory_kib("VmRSS")
    sharded = load_model(path, mesh=mesh)
    peak = (_memory_kib("VmHWM") - before) * 1024
    share = weight_bytes / mesh.size()
    print(f"rank {mesh.get_local_rank()}: load peak {peak / 2**20:.1f} MiB, 1/N of the weights "
          f"{share / 2**20:.1f} MiB ({peak / share:.3f}x)")
    assert peak <= 1.1 * share, (peak, share)
    reference = load_model(path)
    ids, mask = _inputs(reference.config)
    with torch.no_grad():
        gap = (sharded(ids, attention_mask=mask).logits.full_tensor()
               - reference(ids, attention_mask=mask).logits).abs().max().item()
    assert gap <= 1e-5, gap


@pytest.mark.slow
def test_a_rank_loading_a_sharded_checkpoint_peaks_at_its_share_of_the_weights(tmp_path):
    """A 400 MB random-weight checkpoint in two files: each of 2 ranks' peak resident memory while
    loading (VmHWM over the RSS before the load, so mapped file pages and every temporary count)
    stays within 1/2 of the weights + 10 %, and the loaded shards give the one-process logits."""
    cfg = ModelConfig(vocab_size=16384, d_model=1024, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden_size=4096,
                      mask_token_id=16383)
    weight_bytes = _write_random_checkpoint(tmp_path / "ckpt", cfg, files=2)
    run_ranks(_check_load_memory, 2, tmp_path, tmp_path / "ckpt", weight_bytes)


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
    dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5, guidance="linear,span:0:-2", cache="dual"),
    dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5, guidance="interval:0.3:0.8", reuse_uncond=True,
         cache="dual"),
    dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5, guidance="interval:0.5:1"),
    dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, guidance="acfg:0.5"),
    dict(gen_length=16, block_length=8, threshold=0.02, cfg_scale=2.0, guidance="linear,norm", cache="dual"),
]


def _check_generate(mesh, name):
    reference = load_model(DATA / name)
    sharded = parallelize(load_model(DATA / name), mesh)
    prompt, mask = left_pad([[5, 17, 99, 42, 7, 260], [11, 12]], pad_id=reference.config.pad_token_id)
    for case in GENERATE_CASES:
        outputs = [generate(model, prompt, attention_mask=mask, generator=torch.Generator().manual_seed(1), **case)
                   for model in (reference, sharded)]
        assert torch.equal(*outputs), (case, outputs)
    # prompts of one length: the first guided pass runs their one unconditional canvas once (sharded logits copied)
    same_length = torch.tensor([[5, 17, 99, 42, 7, 260], [11, 12, 13, 14, 15, 16]])
    for case in (c for c in GENERATE_CASES if c.get("cfg_scale")):
        outputs = [generate(model, same_length, **case) for model in (reference, sharded)]
        assert torch.equal(*outputs), (case, outputs)


# LLaDA2 block decoding (temperature 0, the public rule): the schedule, CFG both ways, no cache.
BLOCK_CASES = [
    dict(gen_length=48, block_length=16, steps=8),
    dict(gen_length=48, block_length=16, steps=8, cfg_scale=1.0),
    dict(gen_length=48, block_length=16, steps=8, cfg_scale=1.0, reuse_uncond=True),
    dict(gen_length=32, block_length=16, steps=4, threshold=0.01, cache=False),
    dict(gen_length=48, block_length=16, steps=8, cfg_scale=1.5, guidance="interval:0.5:1"),
    dict(gen_length=48, block_length=16, steps=8, cfg_scale=1.5, guidance="linear,span:0:-3,norm", cache=False),
]


def _check_block_generate(mesh, name):
    reference = load_model(DATA / name)
    sharded = parallelize(load_model(DATA / name), mesh)
    prompt, mask = left_pad([[5, 17, 99, 42, 7, 260, 3, 9, 11, 70], [11, 12]], pad_id=reference.config.pad_token_id)
    for case in BLOCK_CASES:
        outputs = [block_generate(model, prompt, attention_mask=mask, **case) for model in (reference, sharded)]
        assert torch.equal(*outputs), (case, outputs)
    # sampling gathers the logits: the same draws from the same generator as one process
    sampled = [block_generate(model, prompt, attention_mask=mask, gen_length=32, block_length=16, steps=8,
                              temperature=0.8, top_k=50, top_p=0.9, cfg_scale=1.0,
                              generator=torch.Generator().manual_seed(5)) for model in (reference, sharded)]
    assert torch.equal(*sampled)


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


@pytest.mark.slow
def test_torchrun_eval_with_tp_reports_the_one_process_scores(tiny_checkpoint, tmp_path, capsys):
    """Two ranks: one sharded model scores every item. Four: two copies (ranks 0-1, 2-3), each
    scoring half the items. Rank 0 writes the one-process report either way."""
    args = ["eval", "--model", str(tiny_checkpoint), "--tasks", "arc_easy,lambada", "--data-dir", str(DATA / "tasks"),
            "--limit", "3", "--mc-num", "4", "--batch-size", "4", "--cfg-scale", "0", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for world in (2, 4):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                              "-m", "unmask", *args, "--out", str(tmp_path / f"tp{world}"), "--tp", "2"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        tp = json.loads((tmp_path / f"tp{world}" / "results.json").read_text())
        assert _close(tp["results"], one["results"]) and tp["meta"]["tp"] == 2 and tp["meta"]["world_size"] == world


def _close(a, b) -> bool:
    """Equal structure and text, numbers within 1e-5 relative: a perplexity exponentiates its
    log-likelihood, whose sharded sums differ from one process's in the last float32 bits."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
    return a == b


def test_replicas_need_a_multiple_of_tp_processes(monkeypatch):
    """eval's copies of a sharded model: any multiple of --tp processes; every other command: exactly --tp."""
    from unmask.models.parallel import join_tensor_parallel

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="multiple of 2 processes .* this run has 3.* 2 \\(one copy\\) or 4"):
        join_tensor_parallel(2, torch.device("cpu"), replicas=True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--tp 2 needs 2 processes and this run has 4"):
        join_tensor_parallel(2, torch.device("cpu"))


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


def test_slice_reader_reads_a_narrowed_slice_into_a_view(tmp_path):
    """Along each dim, into a narrowed view of a larger tensor, in the stored dtype and converted."""
    stored = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": stored}, tmp_path / "w.safetensors")
    with SliceReader(tmp_path / "w.safetensors") as reader:
        for dtype in (torch.bfloat16, torch.float32):
            for dim in range(3):
                target = torch.zeros(3, 5, 4, dtype=dtype)
                dest = target.narrow(dim, 1, 2)
                reader.read_into("w", dest, dim, start=1)
                assert torch.equal(target, stored.to(dtype) * (target != 0)), (dtype, dim)
                assert torch.equal(dest, stored.narrow(dim, 1, 2).to(dtype)), (dtype, dim)
        with pytest.raises(ValueError, match="cannot come from"):
            reader.read_into("w", torch.zeros(2, 4, 4), 0, start=0)
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-20])
    with SliceReader(tmp_path / "cut.safetensors") as reader, pytest.raises(ValueError, match="truncated"):
        reader.read_into("w", torch.zeros(1, 5, 4), 0, start=2)
