"""A plain implementation of LLaDA2's block-diffusion `generate`, written from its description
(batch 1, no cache, no guidance): the independent reference the block sampler is tested against."""

import torch


def reference_block_generate(model, prompt, *, gen_length, block_length, steps, threshold, minimal_topk=1,
                             eos_early_stop=False, eos_id, mask_id):
    """(output ids (1, n), forward calls): prompt + text cut after its first EOS, or + gen_length tokens."""
    b, P = block_length, prompt.shape[1]
    steps = min(steps, gen_length // minimal_topk)
    total = -(-(P + gen_length) // b) * b
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[0, :P] = prompt[0]
    n_blocks = total // b
    allowed = torch.tril(torch.ones(n_blocks, n_blocks, dtype=torch.bool))
    allowed = allowed.repeat_interleave(b, 0).repeat_interleave(b, 1)
    counts = [b // steps + (1 if i < b % steps else 0) for i in range(steps)]
    calls = 0
    for k in range(P // b, n_blocks):
        s, e = k * b, (k + 1) * b
        for i in range(steps):
            if not (x[0, s:e] == mask_id).any():
                break
            logits = model(x[:, :e], attention_mask=allowed[:e, :e][None, None],
                           position_ids=torch.arange(e)[None]).logits[0, s:e]
            calls += 1
            confidence, tokens = torch.softmax(logits.float(), -1).max(-1)
            candidates = x[0, s:e] == mask_id
            confidence = torch.where(candidates, confidence, torch.tensor(float("-inf")))
            above = candidates & (confidence > threshold)
            if int(above.sum()) >= counts[i]:
                transfer = above
            else:
                transfer = torch.zeros(b, dtype=torch.bool)
                transfer[confidence.topk(min(counts[i], int(candidates.sum()))).indices] = True
            x[0, s:e] = torch.where(transfer, tokens, x[0, s:e])
            if eos_early_stop and (tokens[transfer] == eos_id).any():
                text = x[0, P:e]
                first = int((text == eos_id).nonzero()[0])
                if not (text[:first] == mask_id).any():
                    return x[:, :P + first + 1], calls
        text = x[0, P:e]
        if (text == eos_id).any():
            return x[:, :P + int((text == eos_id).nonzero()[0]) + 1], calls
    return x[:, :P + gen_length], calls
