"""Expert parallelism on gloo processes: whole experts per rank, tokens sent to them by all-to-all.

As in test_tensor_parallel.py, each check runs on N spawned gloo processes and compares with the
unsharded model on the same rank, so the reference is the single-process model itself.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import DTensor

from test_tensor_parallel import DATA, LAYOUTS, _inputs, run_ranks
from test_tensor_parallel import _check_logits as check_tp_logits
from unmask.cli import main
from unmask.commands.generate import check_tensor_parallel
from unmask.models import load_model
from unmask.models.parallel import ExpertParallel, check_divisible, parallelize, tensor_parallel_plan
from unmask.models.slices import SliceReader
from unmask.sampling import block_generate, generate, left_pad

MOE_LAYOUTS = ["lladamoe-tiny", "llada2-moe-tiny"]
EXPERTS = ("w_gate", "w_up", "w_down")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _expert_reads(path: Path, mesh, monkeypatch) -> tuple[torch.nn.Module, set[str]]:
    """load_model(path, mesh=, expert_parallel=True) and the names of the expert tensors it read."""
    read: set[str] = set()
    original = SliceReader.read_into

    def recording(self, name, dest, dim, start):
        read.add(name)
        return original(self, name, dest, dim, start)

    monkeypatch.setattr(SliceReader, "read_into", recording)
    model = load_model(path, mesh=mesh, expert_parallel=True)
    monkeypatch.undo()
    return model, {name for name in read if ".experts." in name}


def _check_logits(mesh, names):
    """Loaded rank by rank: the rank's experts whole (and only their bytes read), the rest as under
    TP; logits with and without padding, and of fewer tokens than ranks, equal one process's."""
    rank, ep = mesh.get_local_rank(), mesh.size()
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in names:
            path = DATA / name
            reference = load_model(path)
            cfg = reference.config
            sharded, read = _expert_reads(path, mesh, monkeypatch)
            per_rank = cfg.n_experts // ep
            own = range(rank * per_rank, (rank + 1) * per_rank)
            moe_layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
            assert read == {f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight" for i in moe_layers
                            for e in own for proj in ("gate", "up", "down")}, (name, sorted(read)[:4])
            for i in moe_layers:
                for w in EXPERTS:
                    whole = getattr(reference.blocks[i].mlp, w)
                    assert torch.equal(getattr(sharded.blocks[i].mlp, w), whole[own.start:own.stop]), (name, i, w)
            theirs = parallelize(load_model(path), mesh, expert_parallel=True).state_dict()
            for key, mine in sharded.state_dict().items():
                assert torch.equal(_local(mine), _local(theirs[key])), (name, key)
            ids, mask = _inputs(cfg)
            with torch.no_grad():
                for args, kwargs in (((ids,), {}), ((ids,), {"attention_mask": mask}), ((ids[:1, :1],), {})):
                    gap = (sharded(*args, **kwargs).logits.full_tensor()
                           - reference(*args, **kwargs).logits).abs().max().item()
                    print(f"rank {rank}/{ep} {name} {tuple(args[0].shape)} {list(kwargs)}: max gap {gap:.2e}")
                    assert gap <= 1e-5, (name, ep, kwargs.keys(), args[0].shape, gap)


def _check_generate(mesh):
    """The exact sampler, CFG with the dual cache, threshold decoding on LLaDA-MoE (its config names
    no mask token: 383, the last id); LLaDA2's block decoding with its cache and CFG: token-identical
    to one process."""
    reference = load_model(DATA / "lladamoe-tiny")
    sharded = parallelize(load_model(DATA / "lladamoe-tiny"), mesh, expert_parallel=True)
    prompt, mask = left_pad([[5, 17, 99, 42, 7, 260], [11, 12]], pad_id=reference.config.pad_token_id)
    for case in (dict(steps=16, gen_length=16, block_length=8),
                 dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.0, cache="dual"),
                 dict(gen_length=16, block_length=8, threshold=0.02, cfg_scale=1.0, cache="dual", reuse_uncond=True)):
        outputs = [generate(model, prompt, attention_mask=mask, mask_id=383, generator=torch.Generator().manual_seed(1),
                            **case)
                   for model in (reference, sharded)]
        assert torch.equal(*outputs), (case, outputs)
    reference = load_model(DATA / "llada2-moe-tiny")
    sharded = parallelize(load_model(DATA / "llada2-moe-tiny"), mesh, expert_parallel=True)
    prompt, mask = left_pad([[5, 17, 99, 42, 7, 260, 3, 9, 11, 70], [11, 12]], pad_id=reference.config.pad_token_id)
    for case in (dict(gen_length=48, block_length=16, steps=8),
                 dict(gen_length=48, block_length=16, steps=8, cfg_scale=1.0),
                 dict(gen_length=32, block_length=16, steps=4, threshold=0.01, cfg_scale=1.0, reuse_uncond=True)):
        outputs = [block_generate(model, prompt, attention_mask=mask, **case) for model in (reference, sharded)]
        assert torch.equal(*outputs), (case, outputs)


def _check_all(mesh):
    _check_logits(mesh, MOE_LAYOUTS)
    _check_generate(mesh)


@pytest.mark.slow
def test_expert_parallel_logits_and_generate_equal_one_process(tmp_path):
    """2 ranks, both MoE layouts: each rank holds and reads only its experts; logits within 1e-5;
    generate and LLaDA2 block generate token-identical (exact, CFG + caches, threshold)."""
    run_ranks(_check_all, 2, tmp_path)


def _check_four_ranks(mesh):
    check_tp_logits(mesh, [DATA / name for name in LAYOUTS])
    _check_logits(mesh, MOE_LAYOUTS)


@pytest.mark.slow
def test_tensor_and_expert_parallel_logits_on_four_ranks(tmp_path):
    """4 ranks: under TP the three fixture layouts (LLaDA2's 2 KV heads replicated) give the
    one-process logits and scores; with EP (LLaDA-MoE: 2 of its 8 experts per rank; LLaDA2: 4 of
    16) the one-process logits, within 1e-5."""
    run_ranks(_check_four_ranks, 4, tmp_path)


def test_plan_and_checks_split_experts_whole():
    model = load_model(DATA / "llada2-moe-tiny")
    plan = tensor_parallel_plan(model, expert_parallel=True)
    assert isinstance(plan["blocks.1.mlp"], ExpertParallel)
    assert type(plan["blocks.1.mlp.shared.down"]).__name__ == "RowwiseParallel"   # the shared expert as under TP
    cfg = load_model(DATA / "lladamoe-tiny").config.with_(expert_hidden_size=30)   # whole experts: the width
    check_divisible(cfg, 4, expert_parallel=True)
    with pytest.raises(ValueError, match="expert width"):
        check_divisible(cfg, 4)
    with pytest.raises(ValueError, match=r"experts \(6\)"):
        check_divisible(cfg.with_(n_experts=6), 4, expert_parallel=True)
    with pytest.raises(ValueError, match="has none"):
        check_divisible(load_model(DATA / "llada-dense-tiny").config, 2, expert_parallel=True)
    with pytest.raises(ValueError, match="pass mesh="):
        load_model(DATA / "lladamoe-tiny", expert_parallel=True)


def test_ep_errors_say_what_to_change(tiny_checkpoint, capsys):
    moe = str(DATA / "lladamoe-tiny")
    for args, message in ((["--model", moe, "--ep", "2"], "--ep must equal --tp"),
                          (["--model", moe, "--tp", "2", "--ep", "4"], "--ep must equal --tp"),
                          (["--model", str(tiny_checkpoint), "--tp", "2", "--ep", "2"], "has none")):
        assert main(["generate", "hi", *args]) == 2
        assert message in capsys.readouterr().err
    graph = SimpleNamespace(tp=2, ep=2, cuda_graph=True, quantize=None)   # reachable on a GPU only from the CLI
    with pytest.raises(ValueError, match="drop --cuda-graph or --ep"):
        check_tensor_parallel(graph, DATA / "lladamoe-tiny")
