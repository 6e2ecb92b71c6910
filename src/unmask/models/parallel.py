"""Tensor parallelism on PyTorch's own stack: a sharding plan applied to the model from outside.

The model code knows nothing of ranks. `parallelize` takes a loaded `MaskedDiffusionLM` and a 1-D
`DeviceMesh` and shards it the Megatron way with `torch.distributed.tensor.parallel`, as torchtitan
does, so each transformer sublayer costs one all-reduce:
- attention: the fused q|k|v projection column-wise (each rank computes its own heads), the output
  projection row-wise (partial sums, all-reduced);
- dense MLPs and shared experts: the fused gate|up column-wise, down row-wise;
- routed experts: every expert's hidden width split across ranks (its gate/up rows, its down
  columns), so the grouped matmul stays the local compute and the layer's output is one partial
  sum, all-reduced once together with the shared expert's; or, with expert parallelism, whole
  experts per rank and the tokens' rows sent to them and back by all-to-all (`ExpertParallel`);
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
from datetime import timedelta
from functools import partial

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


def check_divisible(cfg, tp: int, expert_parallel: bool = False) -> None:
    """Raise ValueError naming the first size that `tp` ranks cannot split evenly (with
    `expert_parallel`, the experts are split whole instead of by width)."""
    check_tp(tp)
    if expert_parallel and not any(cfg.moe_layers):
        raise ValueError("--ep splits the experts of a mixture-of-experts model and this model has none: drop --ep")
    sizes = {"attention heads": cfg.n_heads, "vocabulary": cfg.vocab_size}
    if any(not moe for moe in cfg.moe_layers):
        sizes["dense MLP width"] = cfg.mlp_hidden_size
    if any(cfg.moe_layers):
        sizes["experts" if expert_parallel else "expert width"] = (cfg.n_experts if expert_parallel
                                                                   else cfg.expert_hidden_size)
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
    _reorder_rows(attn.qkv, _per_rank_rows(parts))
    attn.n_heads, attn.n_kv_heads = q_local, kv_local


def shard_swiglu_rows(mlp: SwiGLU, tp: int) -> None:
    """Reorder the fused gate|up rows so each rank's chunk is [its gate | its up]."""
    h, local = mlp.hidden, mlp.hidden // tp
    rows = torch.arange(local)
    parts = [[r * local + rows, h + r * local + rows] for r in range(tp)]
    _reorder_rows(mlp.gate_up, _per_rank_rows(parts))
    mlp.hidden = local


def _reorder_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Lay out `linear`'s weight rows in the order `rows`; `linear.row_order` keeps it, so a loader
    reading a rank's shard from the checkpoint knows which of the stored rows each of its rows is."""
    linear.weight = nn.Parameter(linear.weight.detach()[rows], requires_grad=False)
    linear.row_order = rows


class ExpertWidthParallel(ParallelStyle):
    """Routed experts split along their hidden width: gate/up rows and down columns per rank.

    Routing is replicated (every rank routes every token the same way), each rank runs the grouped
    matmul over its slice of every expert, and the layer's output, shared expert included, is a
    partial sum made whole by one all-reduce. The expert weights are kept as plain local tensors:
    the grouped matmul is a local kernel that DTensor does not dispatch.
    """

    SHARD_DIMS = {"w_gate": 1, "w_up": 1, "w_down": 2}   # (experts, hidden, dim) and (experts, dim, hidden)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoE):
            raise TypeError(f"ExpertWidthParallel applies to MoE layers, not {type(module).__name__}")
        rank, tp = device_mesh.get_local_rank(), device_mesh.size()
        for name, dim in self.SHARD_DIMS.items():
            local = getattr(module, name).detach().chunk(tp, dim=dim)[rank].contiguous()
            setattr(module, name, nn.Parameter(local, requires_grad=False))
        module.register_forward_hook(lambda mod, args, out: _sum_partials(out, device_mesh))
        return module


class ExpertParallel(ParallelStyle):
    """Routed experts split whole across ranks: rank r holds experts [r·E/N, (r+1)·E/N).

    Under tensor parallelism every rank holds every token (the residual stream is replicated), so
    rank r routes only its 1/N of the layer's tokens (`_routed_token_slice`), sends each
    token-expert row to the rank holding that expert and gets the results back by two all-to-alls
    (`_experts_by_all_to_all`), which run the grouped matmul over the rank's own experts on the rows
    of every rank. The slice's weighted sums, in an otherwise zero output, plus the shared expert's
    partial sum, are made whole by the same one all-reduce as the width split's.

    The plan swaps two methods of the module instance (`routed`, `experts`) for these wrappers
    around the originals: the model code stays as it is.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MoE):
            raise TypeError(f"ExpertParallel applies to MoE layers, not {type(module).__name__}")
        rank, ep = device_mesh.get_local_rank(), device_mesh.size()
        for name in ExpertWidthParallel.SHARD_DIMS:
            local = getattr(module, name).detach().chunk(ep, dim=0)[rank].contiguous()
            setattr(module, name, nn.Parameter(local, requires_grad=False))
        module.expert_parallel = True   # read by `shard_pieces`: experts split whole, along dim 0
        module.experts = partial(_experts_by_all_to_all, module.experts, device_mesh)
        module.routed = partial(_routed_token_slice, module.routed, device_mesh)
        module.register_forward_hook(lambda mod, args, out: _sum_partials(out, device_mesh))
        return module


def _token_bounds(n_tokens: int, mesh: DeviceMesh) -> tuple[int, int]:
    """The rows [start, stop) of a layer's tokens that this rank routes (an even split, uneven by one)."""
    rank, size = mesh.get_local_rank(), mesh.size()
    return rank * n_tokens // size, (rank + 1) * n_tokens // size


def _routed_token_slice(routed, mesh: DeviceMesh, x: torch.Tensor) -> torch.Tensor:
    """`routed` on this rank's slice of the tokens x (N, D), in a zero (N, D) output: a partial sum."""
    start, stop = _token_bounds(x.shape[0], mesh)
    out = x.new_zeros(x.shape)
    out[start:stop] = routed(x[start:stop])
    return out


def _experts_by_all_to_all(local_experts, mesh: DeviceMesh, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The experts' outputs for rows xs grouped by expert (counts[e] rows for expert e of all E),
    computed on the ranks holding them: the counts, then the rows, go out by all-to-all; the rows
    each rank receives (source by source, each source's expert by expert) are regrouped by expert
    for one grouped matmul over its own experts (`local_experts`), and the results come back in
    the order they left."""
    group, ep = mesh.get_group(), mesh.size()
    per_rank = counts.numel() // ep
    received = torch.empty_like(counts)   # [source rank][own expert]: rows each source sends each own expert
    dist.all_to_all_single(received, counts, group=group)
    send = counts.view(ep, per_rank).sum(1).tolist()
    by_source = received.view(ep, per_rank)
    recv = by_source.sum(1).tolist()
    rows = xs.new_empty(sum(recv), xs.shape[1])
    dist.all_to_all_single(rows, xs.contiguous(), recv, send, group=group)
    own_expert = torch.arange(per_rank, device=xs.device).repeat(ep).repeat_interleave(received.long())
    order = torch.argsort(own_expert, stable=True)
    y = local_experts(rows[order], by_source.sum(0, dtype=counts.dtype))
    back = torch.empty_like(y).index_copy_(0, order, y)
    out = y.new_empty(xs.shape[0], y.shape[1])
    dist.all_to_all_single(out, back, send, recv, group=group)
    return out


def _sum_partials(out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return DTensor.from_local(out, mesh, [Partial()]).redistribute(mesh, [Replicate()]).to_local()


def tensor_parallel_plan(model: MaskedDiffusionLM, expert_parallel: bool = False) -> dict[str, ParallelStyle]:
    """The sharding plan of `model`, module name → style (see the module docstring); with
    `expert_parallel` the routed experts are split whole (`ExpertParallel`), not by width."""
    plan: dict[str, ParallelStyle] = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i, block in enumerate(model.blocks):
        b = f"blocks.{i}."
        plan[b + "attn.qkv"], plan[b + "attn.out"] = ColwiseParallel(), RowwiseParallel()
        if isinstance(block.mlp, MoE):
            plan[b + "mlp"] = ExpertParallel() if expert_parallel else ExpertWidthParallel()
            if block.mlp.shared is not None:   # left partial: the MoE's own all-reduce sums it with the experts'
                plan[b + "mlp.shared.gate_up"] = ColwiseParallel()
                plan[b + "mlp.shared.down"] = RowwiseParallel(output_layouts=Partial())
        else:
            plan[b + "mlp.gate_up"], plan[b + "mlp.down"] = ColwiseParallel(), RowwiseParallel()
    return plan


@torch.no_grad()
def parallelize(model: MaskedDiffusionLM, mesh: DeviceMesh, expert_parallel: bool = False) -> MaskedDiffusionLM:
    """Shard `model` (every rank holding the same full weights) over the 1-D `mesh`, in place;
    with `expert_parallel` the routed experts are split whole over the same ranks (`ExpertParallel`).

    Afterwards each rank holds 1/N of the weights (replicated KV heads and norms aside) and
    `model(ids).logits` is a DTensor sharded over the vocabulary; `.full_tensor()` gathers it.
    Inference only: the reordered projections are not trainable parameters.
    """
    tp = mesh.size()
    check_divisible(model.config, tp, expert_parallel)
    if tp == 1:
        return model
    for block in model.blocks:
        shard_attention_rows(block.attn, tp)
        for mlp in (block.mlp, getattr(block.mlp, "shared", None)):
            if isinstance(mlp, SwiGLU):
                shard_swiglu_rows(mlp, tp)
    tied = model.lm_head.weight is model.embed.weight
    parallelize_module(model, mesh, tensor_parallel_plan(model, expert_parallel))
    if tied:   # both modules shard the (V, D) table by rows: keep one copy
        model.lm_head.weight = model.embed.weight
    return model


def shard_pieces(model: nn.Module, name: str, index: tuple,
                 mesh: DeviceMesh | None) -> list[tuple[torch.Tensor, tuple[int, int] | None]]:
    """Where this rank keeps `param[index]` of the full parameter `name`, as (destination, source)
    pairs: the destination, a view of the rank's own tensor, takes `stored.narrow(dim, start, n)` of
    the checkpoint tensor stored as param[index], source = (dim, start), n the destination's size
    along dim; source None is the whole stored tensor.

    A parameter the plan does not shard (or any, with no mesh) is one piece. A sharded one holds
    along its sharded dim a run of rows of the full parameter (in `row_order` for the fused q|k|v and
    gate|up); each maximal run of consecutive stored rows is one piece, so a loader reads only the
    rank's rows, one slice per piece.
    """
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    local, dim = _local_and_dim(module, attr)
    if mesh is None or dim is None:
        return [(local[index], None)]
    n, rank = local.shape[dim], mesh.get_local_rank()
    order = getattr(module, "row_order", None) if attr == "weight" else None
    rows = (torch.arange(n * mesh.size()) if order is None else order)[rank * n:(rank + 1) * n]
    lead = index[0] if index else slice(None)
    if isinstance(lead, int) and dim == 0:   # one expert of experts split whole: read by its rank alone
        first = rank * n
        return [(local[lead - first], (0, 0))] if first <= lead < first + n else []
    if isinstance(lead, int):   # one expert of a stacked (experts, ...) parameter, sharded inside the expert
        local, dim, lead = local[lead], dim - 1, slice(None)
    elif dim != 0:   # a row range of the full parameter, sharded along another dim
        local, lead = local[lead], slice(None)
    start, stop = lead.start or 0, lead.stop if lead.stop is not None else rows.max().item() + 1
    positions = ((rows >= start) & (rows < stop)).nonzero().flatten()
    stored = rows[positions] - start
    breaks = ((positions.diff() != 1) | (stored.diff() != 1)).nonzero().flatten() + 1
    bounds = [0, *breaks.tolist(), len(positions)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            j, row = positions[a].item(), stored[a].item()
            pieces.append((local.narrow(dim, j, b - a), (dim, row)))
    return pieces


def _local_and_dim(module: nn.Module, attr: str) -> tuple[torch.Tensor, int | None]:
    """A parameter's local tensor and the dim the plan shards it along (None: a full copy)."""
    param = getattr(module, attr)
    if isinstance(param, DTensor):
        [placement] = param.placements
        return param.to_local(), (placement.dim % param.ndim if isinstance(placement, Shard) else None)
    if isinstance(module, MoE) and attr in ExpertWidthParallel.SHARD_DIMS:
        return param, 0 if getattr(module, "expert_parallel", False) else ExpertWidthParallel.SHARD_DIMS[attr]
    return param, None


def join_tensor_parallel(tp: int, device: torch.device, timeout: timedelta | None = None,
                         replicas: bool = False) -> tuple[DeviceMesh | None, torch.device]:
    """(the 1-D mesh of the `tp` processes that hold this rank's model, this rank's device); (None,
    device) for tp 1.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; the group uses gloo on the CPU and NCCL on CUDA,
    where rank r runs on cuda:LOCAL_RANK. `timeout` bounds each collective (default: torch's). With
    `replicas` (eval) the world may be any multiple of tp: world / tp copies of the sharded model,
    ranks [k·tp, (k + 1)·tp) holding copy k, on a 2-D mesh (replica × tp) whose tp rows are returned.
    """
    if check_tp(tp) == 1:
        return None, device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if replicas and world % tp:
        raise ValueError(f"--tp {tp} needs a multiple of {tp} processes (each {tp} hold one copy of the model) "
                         f"and this run has {world}: launch it with torchrun --nproc-per-node {tp} (one copy) or "
                         f"{2 * tp} (two), ... -m unmask ...")
    if world != tp and not replicas:
        raise ValueError(f"--tp {tp} needs {tp} processes and this run has {world}: launch it with "
                         f"torchrun --nproc-per-node {tp} -m unmask ...")
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--tp {tp} puts each rank on its own GPU (cuda:LOCAL_RANK): use --device cuda, "
                             f"not {device}")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == tp:
        return init_device_mesh(device.type, (tp,)), device
    return init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("replica", "tp"))["tp"], device


def is_first_rank() -> bool:
    """Whether this process speaks for the group (the only one, or rank 0 of a distributed run)."""
    return not dist.is_initialized() or dist.get_rank() == 0
