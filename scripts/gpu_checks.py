"""Correctness checks that need a GPU (run by scripts/gpu_run.sh before the GPU bench).

- the CUDA-graph block step gives the same tokens as the eager dual cache (dense fp32, MoE bf16),
  with padding, CFG, reuse_uncond, threshold decoding and EOS stops;
- the server's fixed shapes for graphs (extra rows and left-padding columns, serve/batching.py)
  leave each row's graphed tokens those of the eager, unpadded batch;
- the MoE's grouped kernel (F.grouped_mm, bf16 on CUDA) matches the per-expert loop;
- the random-weight bench models give finite logits in bf16.
Prints one PASS/FAIL line per check; exit status 1 if any failed.
"""

import sys
import traceback

import torch

import unmask
from unmask.bench import random_model
from unmask.models import ModelConfig
from unmask.models.transformer import grouped_matmul
from unmask.sampling import left_pad
from unmask.serve.batching import FixedShapes

failures = []


def check(name, fn):
    try:
        detail = fn()
        print(f"PASS {name} {detail or ''}", flush=True)
    except Exception:
        failures.append(name)
        print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


def graph_tokens_match(model, label):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 11, 8)]
    ids, mask = left_pad(prompts, pad_id=0)
    ids, mask = ids.cuda(), mask.cuda()
    base = dict(steps=32, gen_length=64, block_length=16, attention_mask=mask)
    modes = [dict(cache="dual"), dict(cache="dual", cfg_scale=1.0), dict(cache="dual", cfg_scale=1.0, reuse_uncond=True),
             dict(cache="dual", threshold=0.2, cfg_scale=0.5), dict(cache="dual", stop_at_eos=True, eos_token_id=7)]
    agree = []
    for mode in modes:
        eager = unmask.generate(model, ids, **base, **mode)
        graph = unmask.generate(model, ids, cuda_graph=True, **base, **mode)
        again = unmask.generate(model, ids, cuda_graph=True, **base, **mode)
        assert torch.equal(graph, again), f"{label} {mode}: two graphed runs differ"
        agree.append(float((graph == eager).float().mean()))
    assert min(agree) >= 0.98, f"{label}: token agreement graph vs eager {agree}"
    return f"token agreement with the eager dual cache per mode: {agree}"


def padded_shapes_match(model, label):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 40, 8)]
    ids, mask = left_pad(prompts, pad_id=0)
    fixed_ids, fixed_mask = FixedShapes(max_rows=16).pad(prompts, pad_id=0)   # 4 rows, 64 columns
    base = dict(steps=32, gen_length=64, block_length=16, cache="dual")
    eager = unmask.generate(model, ids.cuda(), attention_mask=mask.cuda(), **base)[:, -64:]
    graph = unmask.generate(model, fixed_ids.cuda(), attention_mask=fixed_mask.cuda(), cuda_graph=True, **base)
    agree = float((graph[:len(prompts), -64:] == eager).float().mean())
    assert tuple(fixed_ids.shape) == (4, 64) and agree >= 0.98, f"{label}: agreement {agree}"
    return f"token agreement, graphed at {tuple(fixed_ids.shape)} vs eager at {tuple(ids.shape)}: {agree}"


def dense_graph():
    return graph_tokens_match(random_model(ModelConfig(), "cuda", torch.float32, seed=1), "dense fp32")


def moe_cfg():
    return ModelConfig(layout="lladamoe", d_model=128, n_heads=4, n_kv_heads=4, n_experts=8, experts_per_token=2,
                       expert_hidden_size=64, qk_norm=True, mlp_hidden_size=256)


def moe_graph():
    return graph_tokens_match(random_model(moe_cfg(), "cuda", torch.bfloat16, seed=2), "moe bf16")


def grouped_kernel():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(64, 1024, 2048, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    counts = torch.bincount(torch.randint(0, 64, (300,), device="cuda", generator=g), minlength=64).int()
    with torch.no_grad():
        fast = grouped_matmul(x, w, counts)
    with torch.enable_grad():  # the loop
        slow = grouped_matmul(x, w, counts)
    err = float((fast.float() - slow.float()).norm() / slow.float().norm())
    assert err < 1e-2, err
    return f"relative error {err:.2e}"


def bench_shapes_finite():
    from unmask.bench import SHAPES
    out = []
    for name in ("llada-8b", "llada-moe-7b-a1b"):
        cfg = SHAPES[name]
        model = random_model(cfg, "cuda", torch.bfloat16)
        with torch.no_grad():
            logits = model(torch.randint(0, 1000, (1, 320), device="cuda")).logits
        assert torch.isfinite(logits).all()
        out.append(f"{name} {model.num_parameters() / 1e9:.2f}B")
        del model, logits
        torch.cuda.empty_cache()
    return ", ".join(out)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), "F.grouped_mm:", hasattr(torch.nn.functional, "grouped_mm"))
    check("graph tokens = eager tokens, dense fp32", dense_graph)
    check("graph tokens = eager tokens, moe bf16", moe_graph)
    check("server's fixed shapes: graphed tokens = eager unpadded tokens, dense fp32",
          lambda: padded_shapes_match(random_model(ModelConfig(), "cuda", torch.float32, seed=3), "dense fp32"))
    check("grouped_mm bf16 = per-expert loop", grouped_kernel)
    check("bench shapes give finite bf16 logits", bench_shapes_finite)
    sys.exit(1 if failures else 0)
