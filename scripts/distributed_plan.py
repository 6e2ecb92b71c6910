"""The memory and speed plan of docs/distributed.md, computed: bytes per rank and per denoising step
under unmask's tensor-parallel plan (models/parallel.py) for LLaDA-8B, LLaDA2-mini and LLaDA2-flash,
and what expert parallelism (--ep) sends per MoE layer against the width split.

Weights are counted on the real module tree (built on the meta device, so nothing is allocated) and
split the way `parallelize` splits them. Run: PYTHONPATH=src python3 scripts/distributed_plan.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.models import MaskedDiffusionLM, ModelConfig

GIB = 2**30
BF16 = 2

# Public configs (SPEC.md §5). LLaDA2-flash's shape is the Ling-flash-2.0 design it is built on
# (hidden 4096, 32 layers, 32 heads / 4 KV heads, 256 experts of width 1024, top 8, 1 shared expert);
# its parameter count here, ~103B, matches the announced 100B total / 6.1B active.
MODELS = {
    "LLaDA-8B": ModelConfig(layout="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                            mlp_hidden_size=12288, max_seq_len=4096),
    "LLaDA2-mini": ModelConfig(layout="llada2_moe", vocab_size=157184, d_model=2048, n_layers=20, n_heads=16,
                               n_kv_heads=4, head_dim=128, mlp_hidden_size=5120, n_experts=256, experts_per_token=8,
                               expert_hidden_size=512, shared_expert_hidden_size=512, qk_norm=True,
                               router="sigmoid", n_groups=8, topk_groups=4, expert_bias=True, norm_topk_prob=True,
                               moe_layers=[False] + [True] * 19, max_seq_len=32768),
    "LLaDA2-flash": ModelConfig(layout="llada2_moe", vocab_size=157184, d_model=4096, n_layers=32, n_heads=32,
                                n_kv_heads=4, head_dim=128, mlp_hidden_size=9216, n_experts=256, experts_per_token=8,
                                expert_hidden_size=1024, shared_expert_hidden_size=1024, qk_norm=True,
                                router="sigmoid", n_groups=8, topk_groups=4, expert_bias=True, norm_topk_prob=True,
                                moe_layers=[False] + [True] * 31, max_seq_len=32768),
}


@dataclass
class Hardware:
    name: str
    hbm_bytes_per_s: float
    bf16_flops: float
    allreduce_bytes_per_s: float   # NVLink bus bandwidth an all-reduce reaches
    allreduce_latency_s: float     # one small all-reduce across 8 GPUs


H100 = Hardware("8×H100 SXM 80 GB", 3.35e12, 989e12, 450e9, 20e-6)
H20 = Hardware("8×H20 96 GB", 4.0e12, 148e12, 450e9, 20e-6)   # the GPUs of SGLang's LLaDA2.0-flash figure


def weights(cfg: ModelConfig) -> tuple[int, int]:
    """(total parameters, parameters one token reads: embeddings row aside, top-k experts only)."""
    with torch.device("meta"):
        model = MaskedDiffusionLM(cfg)
    total = model.num_parameters()
    experts = sum(b.mlp.w_gate.numel() * 3 for b in model.blocks if hasattr(b.mlp, "w_gate"))
    per_expert_share = cfg.experts_per_token / cfg.n_experts if cfg.n_experts else 0
    active = total - model.embed.weight.numel() - experts + int(experts * per_expert_share)
    return total, active


def weight_bytes_per_rank(cfg: ModelConfig, tp: int) -> float:
    """bf16 weights on one rank: everything split N ways but the norms, routers and replicated KV heads."""
    total, _ = weights(cfg)
    kv_rows = 2 * cfg.n_kv_heads * cfg.head_dim * cfg.d_model * cfg.n_layers
    replicated_kv = kv_rows * (max(tp // cfg.n_kv_heads, 1) - 1)          # extra copies of KV heads
    return (total + replicated_kv) * BF16 / tp


def kv_bytes_per_rank(cfg: ModelConfig, tp: int, batch: int, context: int) -> float:
    kv_local = max(cfg.n_kv_heads // tp, 1)
    return 2 * cfg.n_layers * kv_local * cfg.head_dim * BF16 * batch * context


def activation_bytes_per_rank(cfg: ModelConfig, tp: int, tokens: int) -> float:
    """Peak transient of one layer of a full pass over `tokens` (B·T): the replicated residual stream
    (x, its norm, the sublayer output: 3 copies) and the widest per-rank intermediate."""
    residual = 3 * tokens * cfg.d_model * BF16
    dense = tokens * 2 * cfg.mlp_hidden_size // tp * BF16
    if cfg.n_experts:   # token copies routed to experts, and their gate|up slice
        moe = tokens * cfg.experts_per_token * (2 * cfg.d_model + 2 * cfg.expert_hidden_size // tp) * BF16
        dense = max(dense, moe)
    return residual + dense


def allreduce_bytes_per_step(cfg: ModelConfig, tp: int, tokens_run: int) -> tuple[int, float]:
    """(all-reduces, bytes each rank sends) in one forward pass over `tokens_run` rows·columns:
    one per attention and one per MLP/MoE output, one for the embedding; a ring sends 2(N−1)/N × size."""
    count = 2 * cfg.n_layers + 1
    return count, count * tokens_run * cfg.d_model * BF16 * 2 * (tp - 1) / tp


def moe_layer_bytes(cfg: ModelConfig, n: int, tokens_run: int) -> tuple[float, float]:
    """(bytes each rank sends per MoE layer with the experts split by width, with them split whole).

    The width split: the layer's one all-reduce. Expert parallelism: the same all-reduce, plus the
    rank's 1/N of the token-expert rows sent out and their results back, of which (N−1)/N leave the
    rank under uniform routing (the counts' all-to-all, E int32s, is left out)."""
    allreduce = tokens_run * cfg.d_model * BF16 * 2 * (n - 1) / n
    rows = 2 * cfg.experts_per_token * tokens_run * cfg.d_model * BF16 * (n - 1) / n**2
    return allreduce, allreduce + rows


def step_time(cfg: ModelConfig, tp: int, tokens_run: int, hw: Hardware) -> dict:
    """Lower bounds of one denoising step: each rank reads its weights once (the experts its tokens
    reach), computes 2 FLOPs per active parameter per token, and runs the all-reduces."""
    total, active = weights(cfg)
    read = weight_bytes_per_rank(cfg, tp)
    if cfg.n_experts:   # experts no token of this step reaches are not read
        experts_total = 3 * cfg.n_experts * cfg.expert_hidden_size * cfg.d_model * sum(cfg.moe_layers)
        reached = 1 - (1 - cfg.experts_per_token / cfg.n_experts) ** tokens_run
        read -= experts_total * (1 - reached) * BF16 / tp
    compute = 2 * active * tokens_run / tp / hw.bf16_flops
    count, sent = allreduce_bytes_per_step(cfg, tp, tokens_run)
    comm = count * hw.allreduce_latency_s + sent / hw.allreduce_bytes_per_s
    return {"memory": read / hw.hbm_bytes_per_s, "compute": compute, "comm": comm,
            "step": max(read / hw.hbm_bytes_per_s, compute) + comm}


def main() -> None:
    tp = 8
    for name, cfg in MODELS.items():
        total, active = weights(cfg)
        print(f"\n### {name}: {total / 1e9:.1f}B parameters, {active / 1e9:.2f}B read per token "
              f"(embeddings aside), {total * BF16 / GIB:.1f} GiB in bf16\n")
        print(f"weights per rank at TP {tp}: {weight_bytes_per_rank(cfg, tp) / GIB:.2f} GiB\n")
        print("| batch | context | KV cache / rank | activations / rank (full pass) |")
        print("|---:|---:|---:|---:|")
        for batch in (1, 8, 32):
            for context in (4096, 32768):
                kv = kv_bytes_per_rank(cfg, tp, batch, context)
                act = activation_bytes_per_rank(cfg, tp, batch * context)
                print(f"| {batch} | {context // 1024}K | {kv / GIB:.2f} GiB | {act / GIB:.2f} GiB |")
        for hw in (H100, H20):
            print(f"\n| step ({hw.name}, TP {tp}) | tokens run | all-reduces | MB sent / rank | memory ms | "
                  f"compute ms | comm ms | step ms |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for label, batch, run in (("dual cache, batch 1, block 32", 1, 32),
                                      ("dual cache, batch 32, block 32", 32, 32),
                                      ("full 4K canvas, batch 1 (refresh / no cache)", 1, 4096),
                                      ("full 4K canvas, batch 8", 8, 4096)):
                count, sent = allreduce_bytes_per_step(cfg, tp, batch * run)
                t = step_time(cfg, tp, batch * run, hw)
                print(f"| {label} | {batch * run} | {count} | {sent / 1e6:.1f} | {t['memory'] * 1e3:.2f} | "
                      f"{t['compute'] * 1e3:.2f} | {t['comm'] * 1e3:.2f} | {t['step'] * 1e3:.2f} |")
    print(f"\n### Expert parallelism against the width split, {tp} ranks\n")
    print("| model, 8 ranks | step | MoE layer, width split (MB/rank) | MoE layer, EP (MB/rank) | "
          "step, width split (MB) | step, EP (MB) | EP's extra latency (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, cfg in MODELS.items():
        layers = sum(cfg.moe_layers)
        if not layers:
            continue
        for label, tokens in (("dual cache, batch 1, block 32", 32), ("dual cache, batch 32, block 32", 1024),
                              ("full 4K canvas, batch 1", 4096)):
            width, ep = moe_layer_bytes(cfg, tp, tokens)
            extra = 3 * layers * H100.allreduce_latency_s   # the counts and the rows out and back
            print(f"| {name} | {label} | {width / 1e6:.2f} | {ep / 1e6:.2f} | {layers * width / 1e6:.1f} | "
                  f"{layers * ep / 1e6:.1f} | {extra * 1e3:.2f} |")

if __name__ == "__main__":
    main()
