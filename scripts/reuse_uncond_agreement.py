"""How far `reuse_uncond` strays from exact guidance, on in-domain prompts (docs/fast-sampling.md).

Bundled model, the first 64 world_cloze contexts, gen 64, block 16, one token per step, cfg 1.
For each mode: the fraction of generated tokens equal to exact guided sampling's, and the mean
position of the first token that differs. About 3 minutes on 2 CPU cores.
Usage: python scripts/reuse_uncond_agreement.py
"""

import torch

import unmask
from unmask.bench import suite_requests
from unmask.sampling import left_pad

model, tok = unmask.load()
prompts, _ = suite_requests(tok, "world_cloze", 64, model.config.max_seq_len - 64)
ids, mask = left_pad(prompts, tok.pad_token_id if tok.pad_token_id is not None else 0)
schedule = dict(steps=64, gen_length=64, block_length=16, attention_mask=mask)


def generated(cfg_scale: float = 1.0, **options) -> torch.Tensor:
    return unmask.generate(model, ids, cfg_scale=cfg_scale, **schedule, **options)[:, ids.shape[1]:]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    differs = a != b
    at = torch.where(differs.any(1), differs.float().argmax(1), torch.full((a.shape[0],), a.shape[1]))
    return at.float().mean().item()


exact = generated()
print("| mode | agreement with exact guidance | first difference (mean position) |\n|---|---|---|")
for name, out in [("no guidance (cfg 0)", generated(0.0)), ("dual, no guidance", generated(0.0, cache="dual")),
                  ("dual+cfg", generated(cache="dual")),
                  ("dual+cfg reuse", generated(cache="dual", reuse_uncond=True)),
                  ("dual+cfg reuse, cache_refresh=4", generated(cache="dual", reuse_uncond=True, cache_refresh=4))]:
    print(f"| {name} | {(out == exact).float().mean():.3f} | {first_difference(out, exact):.1f} |")
