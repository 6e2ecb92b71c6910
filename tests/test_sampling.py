"""The sampler against a deliberately plain implementation of SPEC.md §3, and its extra behaviour."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import unmask
from unmask.models import load_model
from unmask.sampling import (left_pad, propose_tokens, select_top, token_confidence, transfer_schedule,
                             unconditional_canvas)

DATA = Path(__file__).parent / "data"
MASK = 383


@torch.no_grad()
def plain_reference(model, prompt, steps, gen_length, block_length, cfg_scale, mask_id=MASK):
    """SPEC.md §3 at batch 1, temperature 0, 'low_confidence', written as plainly as possible."""
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), mask_id, dtype=torch.long)
    x[0, :P] = prompt[0]
    is_prompt = [bool(x[0, j] != mask_id) for j in range(P + gen_length)]
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for b in range(num_blocks):
        start, end = P + b * block_length, P + (b + 1) * block_length
        n = sum(int(x[0, j] == mask_id) for j in range(start, end))
        counts = [n // per_block + (1 if s < n % per_block else 0) for s in range(per_block)]
        for s in range(per_block):
            if cfg_scale > 0:
                un = x.clone()
                for j in range(P + gen_length):
                    if is_prompt[j]:
                        un[0, j] = mask_id
                both = model(torch.cat([x, un])).logits
                logits = both[1:] + (cfg_scale + 1) * (both[:1] - both[1:])
            else:
                logits = model(x).logits
            probs = torch.softmax(logits, -1)
            scored = []
            for j in range(end):
                if x[0, j] == mask_id:
                    token = int(logits[0, j].argmax())
                    scored.append((float(probs[0, j, token]), j, token))
            scored.sort(key=lambda c: -c[0])
            for _, j, token in scored[:counts[s]]:
                x[0, j] = token
    return x


@pytest.fixture(scope="module")
def dense():
    return load_model(DATA / "llada-dense-tiny")


@pytest.fixture(scope="module")
def moe():
    return load_model(DATA / "lladamoe-tiny")


GRID = [  # (steps, gen_length, block_length)
    (8, 8, 8), (4, 8, 8), (8, 16, 4), (12, 24, 8), (3, 12, 12), (6, 12, 6), (16, 16, 16), (2, 16, 8),
]


@pytest.mark.parametrize("steps,gen_length,block_length", GRID)
@pytest.mark.parametrize("cfg_scale", [0.0, 0.5, 2.0])
def test_token_identical_to_reference(dense, steps, gen_length, block_length, cfg_scale):
    prompt = torch.randint(0, 380, (1, 7), generator=torch.Generator().manual_seed(steps * 31 + gen_length))
    ours = unmask.generate(dense, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                           cfg_scale=cfg_scale)
    assert torch.equal(ours, plain_reference(dense, prompt, steps, gen_length, block_length, cfg_scale))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_token_identical_on_moe(moe, cfg_scale):
    prompt = torch.randint(0, 380, (1, 9), generator=torch.Generator().manual_seed(3))
    ours = unmask.generate(moe, prompt, steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale, mask_id=MASK)
    assert torch.equal(ours, plain_reference(moe, prompt, 8, 16, 8, cfg_scale))


def test_infilling_masks_in_prompt_match_reference(dense):
    prompt = torch.randint(0, 380, (1, 10), generator=torch.Generator().manual_seed(5))
    prompt[0, 3] = prompt[0, 6] = MASK
    ours = unmask.generate(dense, prompt, steps=8, gen_length=8, block_length=4, cfg_scale=0.5)
    assert torch.equal(ours, plain_reference(dense, prompt, 8, 8, 4, 0.5))
    assert ours[0, 3] != MASK and ours[0, 6] != MASK


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_batch_rows_equal_prompts_run_alone(cfg_scale):
    model = load_model(DATA / "llada-dense-tiny", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 380, (n,), generator=g).tolist() for n in (3, 11, 7)]
    ids, mask = left_pad(prompts, pad_id=381)
    batch = unmask.generate(model, ids, attention_mask=mask, steps=8, gen_length=16, block_length=8,
                            cfg_scale=cfg_scale)
    for row, p in enumerate(prompts):
        alone = unmask.generate(model, torch.tensor([p]), steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale)
        assert torch.equal(batch[row, -16:], alone[0, -16:])
        assert torch.equal(batch[row, ids.shape[1] - len(p):ids.shape[1]], torch.tensor(p))
    assert (batch[0, :ids.shape[1] - 3] == 381).all()  # padding is never committed


def test_left_pad():
    ids, mask = left_pad([[5, 6], [7], []], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7], [0, 0]]
    assert mask.tolist() == [[1, 1], [0, 1], [0, 0]]


def test_transfer_schedule():
    assert transfer_schedule(torch.tensor([10, 3, 0]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_select_top_varies_k_per_row_and_skips_minus_inf():
    conf = torch.tensor([[0.1, 0.9, 0.5, float("-inf")], [0.3, float("-inf"), 0.2, 0.8]])
    chosen = select_top(conf, torch.tensor([2, 4]))
    assert chosen.tolist() == [[False, True, True, False], [True, False, True, True]]


def test_confidence_rules():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]]))
    tokens = torch.tensor([[0, 1]])
    assert torch.allclose(token_confidence(logits, tokens, "low_confidence"), torch.tensor([[0.7, 0.35]]))
    assert torch.allclose(token_confidence(logits, tokens, "margin"), torch.tensor([[0.5, 0.05]]))
    entropy = -torch.tensor([sum(p * math.log(p) for p in (0.7, 0.2, 0.1)), sum(p * math.log(p) for p in (0.4, 0.35, 0.25))])
    assert torch.allclose(token_confidence(logits, tokens, "entropy"), -entropy.view(1, 2))
    r = token_confidence(logits, tokens, "random", torch.Generator().manual_seed(0))
    assert ((r >= 0) & (r < 1)).all()
    with pytest.raises(ValueError, match="unknown remasking"):
        token_confidence(logits, tokens, "nope")


def test_gumbel_max_samples_softmax_of_logits_over_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    T = 0.7
    n = 40000
    draws = propose_tokens(logits.expand(n, 4), T, torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=4).double()
    expected = torch.softmax(logits.double() / T, -1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001
    assert torch.equal(propose_tokens(logits.view(1, 4), 0.0), torch.tensor([3]))


def test_temperature_sampling_is_reproducible(dense):
    prompt = torch.randint(0, 380, (1, 5))
    kw = dict(steps=8, gen_length=8, block_length=8, temperature=1.0, remasking="random")
    a = unmask.generate(dense, prompt, generator=torch.Generator().manual_seed(1), **kw)
    b = unmask.generate(dense, prompt, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("rule", ["low_confidence", "random", "margin", "entropy"])
def test_every_rule_fills_the_canvas(dense, rule):
    out = unmask.generate(dense, torch.randint(0, 380, (2, 5)), steps=8, gen_length=16, block_length=8,
                          remasking=rule, cfg_scale=0.5, generator=torch.Generator().manual_seed(0))
    assert not (out == MASK).any()


def test_unconditional_canvas_masks_only_the_prompt():
    x = torch.tensor([[1, 2, MASK, 4]])
    assert unconditional_canvas(x, torch.tensor([[True, True, False, False]]), MASK).tolist() == [[MASK, MASK, MASK, 4]]


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits at each canvas position are fixed in advance."""

    def __init__(self, table, eos=0, eot=None):
        super().__init__()
        self.table = table  # (T, V)
        self.config = SimpleNamespace(mask_token_id=table.shape[1] - 1, vocab_size=table.shape[1], eos_token_id=eos,
                                      eot_token_id=eot, max_seq_len=table.shape[0])

    def forward(self, x, attention_mask=None):
        return SimpleNamespace(logits=self.table[: x.shape[1]].expand(x.shape[0], -1, -1).clone())


def eos_heavy_model(T=10, V=8):
    """EOS (id 0) is the most likely token at even positions, token 5 at odd ones (less confident)."""
    table = torch.full((T, V), -5.0)
    table[0::2, 0] = 5.0
    table[1::2, 5] = 2.0
    return FixedLogits(table)


def test_suppress_tokens_never_proposes_eos():
    model = eos_heavy_model()
    out = unmask.generate(model, torch.tensor([[3, 4]]), steps=8, gen_length=8, block_length=8, suppress_tokens=[0])
    assert not (out[0, 2:] == 0).any()


def test_eos_last_decides_eos_after_everything_else():
    model = eos_heavy_model()
    order = []
    unmask.generate(model, torch.tensor([[3, 4]]), steps=8, gen_length=8, block_length=8, eos_last=True,
                    temperature=1.0, generator=torch.Generator().manual_seed(0),
                    callback=lambda s: order.extend(s.x[0, s.committed[0]].tolist()))
    first_eos = order.index(0)
    assert all(t == 0 for t in order[first_eos:]) and order.count(0) >= 1
    plain = []
    unmask.generate(model, torch.tensor([[3, 4]]), steps=8, gen_length=8, block_length=8,
                    callback=lambda s: plain.extend(s.x[0, s.committed[0]].tolist()))
    assert plain[0] == 0  # without the option EOS, being most confident, goes first


def test_stop_at_eos_ends_the_row_early():
    table = torch.full((18, 8), -5.0)
    table[:, 4] = 1.0
    table[5, 0] = 9.0  # position 5 (3rd generated) is a confident EOS
    model = FixedLogits(table)
    out = unmask.generate(model, torch.tensor([[3, 4]]), steps=16, gen_length=16, block_length=4, stop_at_eos=True,
                          return_dict_in_generate=True)
    assert out.sequences[0].tolist() == [3, 4, 4, 4, 4, 0] + [0] * 12
    assert out.forward_passes <= 8  # the last blocks were never run


def test_callback_and_history(dense):
    states = []
    out = unmask.generate(dense, torch.randint(0, 380, (1, 4)), steps=6, gen_length=12, block_length=4,
                          callback=states.append, output_history=True, return_dict_in_generate=True)
    assert len(out.history) == 6 == out.steps == out.forward_passes
    assert torch.equal(out.history[-1], out.sequences)
    assert [int(s.committed.sum()) for s in states] == [2] * 6
    assert all(s.prompt_length == 4 for s in states)


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=10, block_length=4), "multiple of block_length"),
    (dict(steps=3, gen_length=8, block_length=4), "multiple of the number of blocks"),
    (dict(steps=16, gen_length=8, block_length=8), "steps per block"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(remasking="confident"), "unknown remasking"),
    (dict(mask_id=1000), "outside the model's vocabulary"),
    (dict(gen_length=512, block_length=512, steps=512), "exceeds the model's context"),
    (dict(temperature=-0.1), "temperature"),
])
def test_clear_errors(dense, kwargs, message):
    args = dict(steps=8, gen_length=8, block_length=8) | kwargs
    with pytest.raises(ValueError, match=message):
        unmask.generate(dense, torch.randint(0, 380, (1, 4)), **args)


def test_a_model_without_mask_id_needs_one(moe):
    with pytest.raises(ValueError, match="pass mask_id"):
        unmask.generate(moe, torch.randint(0, 380, (1, 4)), steps=4, gen_length=4, block_length=4)


@pytest.mark.parametrize("gen_length, preferred, steps, expected", [
    (64, 32, None, 32), (48, 32, None, 24), (97, 32, None, 97), (10, 32, None, 10), (6, 4, None, 6),
    (64, 32, 8, 32), (64, 32, 1, 64), (64, 16, 6, 64)])
def test_block_length_for_cuts_any_length_into_whole_blocks(gen_length, preferred, steps, expected):
    from unmask.sampling import block_length_for

    block = block_length_for(gen_length, preferred, steps)
    assert block == expected and gen_length % block == 0
