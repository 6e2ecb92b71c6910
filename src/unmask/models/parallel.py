"""Tensor parallelism on PyTorch's own stack: a sharding plan applied to the model from outside.

The model code knows nothing of ranks. `parallelize` takes a loaded `MaskedDiffusionLM` and a 1-D
`DeviceMesh` and shards it the Megatron way with `torch.distributed.tensor.parallel`, as torchtitan
does, so each transformer sublayer costs one all-reduce:
- attention: the fused q|k|v projection column-wise (each rank computes its own heads), the output
  projection row-wise (partial sums, all-reduced);
- dense MLPs and shared experts: the fused gate|up column-wise, down row-wise;
- routed experts: every expert's hidden width split across ranks (its gate/up rows, its down
  columns), so the grouped matmul stays the local compute and the layer's output is one partial
  sum, all-reduced once together with the shared expert's;
- embedding vocabulary-parallel (each rank looks up its rows of the table, an all-reduce fills in
  the rest) and LM head column-wise with the logits left sharded over the vocabulary: the model
  returns a DTensor `Shard(-1)` of the logits and the sampler decodes on the shards
  (`sampling/vocab_parallel.py`), so no rank ever holds the full-vocabulary logits.

The fused projections hold several tensors side by side (q|k|v, gate|up); a plain column split
would hand rank 0 all of q and rank 1 the keys and values. `_per_rank_rows` first reorders the
rows so each rank's contiguous chunk is [its q heads | its k heads | its v heads] (and [its gate |
its up]), and the module's head counts become the per-rank ones. Grouped-query attention with
fewer KV heads than ranks (LLaDA2-mini: 4 KV heads, TP 8) replicates KV heads: each rank keeps
the one KV head its query heads read, so KV heads are stored (and cached) N / n_kv_heads times.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               parallelize_module)

from .transformer import MoE, MaskedDiffusionLM, SwiGLU


def check_tp(tp: int) -> int:
    """The tensor-parallel degree, refused unless a positive integer."""
    if type(tp) is not int or tp < 1:
        raise ValueError(f"--tp must be a positive integer (got {tp!r})")
    return tp


def check_divisible(cfg, tp: int) -> None:
    """Raise ValueError naming the first size that `tp` ranks cannot split evenly."""
    check_tp(tp)
    sizes = {"attention heads": cfg.n_heads, "vocabulary": cfg.vocab_size}
    if any(not moe for moe in cfg.moe_layers):
        sizes["dense MLP width"] = cfg.mlp_hidden_size
    if any(cfg.moe_layers):
        sizes["expert width"] = cfg.expert_hidden_size
        if cfg.shared_expert_hidden_size:
            sizes["shared expert width"] = cfg.shared_expert_hidden_size
    for what, size in sizes.items():
        if size % tp:
            raise ValueError(f"--tp {tp} does not divide the model's {what} ({size}): use a tensor-parallel "
                             f"degree that divides it")
    kv = cfg.n_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"--tp {tp} and the model's {kv} KV heads: one must divide the other (fewer KV heads "
                         f"than ranks are replicated)")


def _per_rank_rows(parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """Row indices that lay out, rank after rank, each rank's pieces: parts[rank] = [rows, ...]."""
    return torch.cat([torch.cat(pieces) for pieces in parts])


def _heads_rows(head: int, count: int, base: int, head_dim: int) -> torch.Tensor:
    return base + torch.arange(head * head_dim, (head + count) * head_dim)


def shard_attention_rows(attn: nn.Module, tp: int) -> None:
    """Reorder (and, for KV heads fewer than ranks, replicate) the fused q|k|v rows rank by rank;
    set the module's head counts to one rank's."""
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q_local, kv_local = H // tp, max(K // tp, 1)
    group = H // K   # query heads per KV head
    parts = []
    for r in range(tp):
        first_kv = r * q_local // group
        parts.append([_heads_rows(r * q_local, q_local, 0, D), _heads_rows(first_kv, kv_local, H * D, D),
                      _heads_rows(first_kv, kv_local, (H + K) * D, D)])
    attn.qkv.weight = nn.Parameter(attn.qkv.weight.detach()[_per_rank_rows(parts)], requires_grad=False)
    attn.n_heads, attn.n_kv_heads = q_local, kv_local


def shard_swiglu_rows(mlp: SwiGLU, tp: int) -> None:
    """Reorder the fused gate|up rows so each rank's chunk is [its gate | its up]."""
    h, local = mlp.hidden, mlp.hidden // tp
    rows = torch.arange(local)
    parts = [[r * local + rows, h + r * local + rows] for r in range(tp)]
    mlp.gate_up.weight = nn.Parameter(mlp.gate_up.weight.detach()[_per_rank_rows(parts)], requires_grad=False)
    mlp.hidden = local


class ExpertWidthParallel(ParallelStyle):
    """Routed experts split along their hidden width: gate/up rows and down columns per rank.

    Routing is replicated (every rank routes every token the same way), each rank runs the grouped
    matmul over its slice of every expert, and the layer's output, shared expert included, is a
    partial sum made whole by one all-reduce. The expert weights are kept as plain local tensors:
    the grouped matmul is a local kernel that DTensor does not dispatch.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoE):
            raise TypeError(f"ExpertWidthParallel applies to MoE layers, not {type(module).__name__}")
        rank, tp = device_mesh.get_local_rank(), device_mesh.size()
        for name, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 2)):
            local = getattr(module, name).detach().chunk(tp, dim=dim)[rank].contiguous()
            setattr(module, name, nn.Parameter(local, requires_grad=False))
        module.register_forward_hook(lambda mod, args, out: _sum_partials(out, device_mesh))
        return module


def _sum_partials(out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return DTensor.from_local(out, mesh, [Partial()]).redistribute(mesh, [Replicate()]).to_local()


def tensor_parallel_plan(model: MaskedDiffusionLM) -> dict[str, ParallelStyle]:
    """The sharding plan of `model`, module name → style (see the module docstring)."""
    plan: dict[str, ParallelStyle] = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i, block in enumerate(model.blocks):
        b = f"blocks.{i}."
        plan[b + "attn.qkv"], plan[b + "attn.out"] = ColwiseParallel(), RowwiseParallel()
        if isinstance(block.mlp, MoE):
            plan[b + "mlp"] = ExpertWidthParallel()
            if block.mlp.shared is not None:   # left partial: the MoE's own all-reduce sums it with the experts'
                plan[b + "mlp.shared.gate_up"] = ColwiseParallel()
                plan[b + "mlp.shared.down"] = RowwiseParallel(output_layouts=Partial())
        else:
            plan[b + "mlp.gate_up"], plan[b + "mlp.down"] = ColwiseParallel(), RowwiseParallel()
    return plan


@torch.no_grad()
def parallelize(model: MaskedDiffusionLM, mesh: DeviceMesh) -> MaskedDiffusionLM:
    """Shard `model` (every rank holding the same full weights) over the 1-D `mesh`, in place.

    Afterwards each rank holds 1/N of the weights (replicated KV heads and norms aside) and
    `model(ids).logits` is a DTensor sharded over the vocabulary; `.full_tensor()` gathers it.
    Inference only: the reordered projections are not trainable parameters.
    """
    tp = mesh.size()
    check_divisible(model.config, tp)
    if tp == 1:
        return model
    for block in model.blocks:
        shard_attention_rows(block.attn, tp)
        for mlp in (block.mlp, getattr(block.mlp, "shared", None)):
            if isinstance(mlp, SwiGLU):
                shard_swiglu_rows(mlp, tp)
    tied = model.lm_head.weight is model.embed.weight
    parallelize_module(model, mesh, tensor_parallel_plan(model))
    if tied:   # both modules shard the (V, D) table by rows: keep one copy
        model.lm_head.weight = model.embed.weight
    return model


def join_tensor_parallel(tp: int, device: torch.device) -> tuple[DeviceMesh | None, torch.device]:
    """(the 1-D mesh of the `tp` processes torchrun started, this rank's device); (None, device) for tp 1.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; the group uses gloo on the CPU and NCCL on CUDA,
    where rank r runs on cuda:LOCAL_RANK.
    """
    if check_tp(tp) == 1:
        return None, device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(f"--tp {tp} needs {tp} processes and this run has {world}: launch it with "
                         f"torchrun --nproc-per-node {tp} -m unmask ...")
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--tp {tp} puts each rank on its own GPU (cuda:LOCAL_RANK): use --device cuda, "
                             f"not {device}")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return init_device_mesh(device.type, (tp,)), device


def is_first_rank() -> bool:
    """Whether this process speaks for the group (the only one, or rank 0 of a distributed run)."""
    return not dist.is_initialized() or dist.get_rank() == 0
