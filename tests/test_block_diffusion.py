"""Block diffusion (LLaDA2.x decoding): the sampler against a plain reference, its exact cache,
batches, and unsupervised CFG on a block-causal canvas."""

from pathlib import Path

import pytest
import torch

from block_reference import reference_block_generate
from unmask.models import load_model
from unmask.sampling.blocks import block_causal_mask, block_generate, threshold_commit
from unmask.sampling.options import OptionError

DATA = Path(__file__).parent / "data"
MASK = 383


@pytest.fixture(scope="module")
def dense():
    return load_model(DATA / "llada-dense-tiny", dtype=torch.float64)


def prompt_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 380, (1, n), generator=torch.Generator().manual_seed(seed))


CASES = [dict(gen_length=24, block_length=8, steps=8, threshold=0.95),
         dict(gen_length=24, block_length=8, steps=4, threshold=0.95),
         dict(gen_length=20, block_length=8, steps=32, threshold=0.95),
         dict(gen_length=24, block_length=8, steps=8, threshold=0.02),
         dict(gen_length=24, block_length=4, steps=2, threshold=0.02),
         dict(gen_length=24, block_length=8, steps=8, threshold=0.95, minimal_topk=4)]


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prompt_length", [5, 8, 13])
def test_matches_the_reference_token_for_token(dense, case, prompt_length, cache):
    prompt = prompt_of(prompt_length)
    expected, calls = reference_block_generate(dense, prompt, eos_id=380, mask_id=MASK, **case)
    out = block_generate(dense, prompt, eos_id=380, mask_id=MASK, cache=cache, return_dict_in_generate=True, **case)
    assert out.sequences.shape == (1, prompt_length + case["gen_length"])
    assert torch.equal(out.sequences[:, :expected.shape[1]], expected)
    assert (out.sequences[0, expected.shape[1]:] == 380).all()
    assert out.forward_passes == calls


def emitted_early(model, prompt) -> int:
    """A token the model commits early after `prompt` (to stand in for EOS)."""
    out = block_generate(model, prompt, gen_length=16, block_length=8, steps=8, threshold=None, eos_id=None,
                         mask_id=MASK)
    return int(out[0, prompt.shape[1] + 2])


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("cache", [False, True])
def test_eos_stops_as_the_reference_does(dense, early_stop, cache):
    prompt = prompt_of(5, seed=1)
    eos = emitted_early(dense, prompt)
    kw = dict(gen_length=24, block_length=8, steps=8, threshold=0.95, eos_early_stop=early_stop, eos_id=eos,
              mask_id=MASK)
    expected, calls = reference_block_generate(dense, prompt, **kw)
    out = block_generate(dense, prompt, cache=cache, return_dict_in_generate=True, **kw)
    assert expected.shape[1] < 5 + 24 and expected[0, -1] == eos
    assert torch.equal(out.sequences[:, :expected.shape[1]], expected) and (out.sequences[0, expected.shape[1]:] == eos).all()
    assert out.forward_passes == calls


@pytest.fixture
def widths(dense, monkeypatch):
    """How many columns each forward pass of `dense` ran (recorded by wrapping its forward)."""
    seen, forward = [], dense.forward

    def recording(input_ids, **kw):
        seen.append(input_ids.shape[1])
        return forward(input_ids, **kw)

    monkeypatch.setattr(dense, "forward", recording)
    return seen


def test_the_cache_never_runs_a_finished_block_again(dense, widths):
    kw = dict(gen_length=32, block_length=8, steps=4, threshold=None, eos_id=None, mask_id=MASK)
    cached = block_generate(dense, prompt_of(11), **kw)
    # block 1 (the prompt's end, 5 masks: 3 steps of 2, 2, 1) first runs the whole window; then
    # every block's first step runs the block before it (now final) and itself, the others the block
    assert widths == [16, 8, 8] + [16, 8, 8, 8] * 4
    assert torch.equal(cached, block_generate(dense, prompt_of(11), cache=False, **kw))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("cache", [False, True])
def test_batched_rows_equal_their_prompts_run_alone(dense, cfg_scale, cache):
    from unmask.sampling import left_pad

    prompts = [prompt_of(n, seed=n)[0].tolist() for n in (3, 9, 16, 6)]
    ids, attention = left_pad(prompts, pad_id=0)
    kw = dict(gen_length=20, block_length=8, steps=8, threshold=0.03, eos_id=381, mask_id=MASK, cfg_scale=cfg_scale,
              cache=cache)
    batch = block_generate(dense, ids, attention_mask=attention, **kw)
    assert batch.shape == (4, ids.shape[1] + 20)
    for row, p in enumerate(prompts):
        alone = block_generate(dense, torch.tensor([p]), **kw)
        assert torch.equal(batch[row, ids.shape[1]:], alone[0, len(p):])
        assert torch.equal(batch[row, :ids.shape[1]], ids[row])


def test_guidance_zero_is_the_unguided_output_and_guidance_changes_it(dense):
    kw = dict(gen_length=24, block_length=8, steps=8, threshold=None, eos_id=None, mask_id=MASK)
    prompt = prompt_of(7, seed=3)
    plain = block_generate(dense, prompt, **kw)
    assert torch.equal(block_generate(dense, prompt, cfg_scale=0.0, **kw), plain)
    guided = block_generate(dense, prompt, cfg_scale=3.0, **kw)
    assert not torch.equal(guided, plain)
    assert torch.equal(block_generate(dense, prompt, cfg_scale=3.0, cache=False, **kw), guided)


def test_guidance_masks_the_prompt_under_the_same_block_causal_mask(dense):
    """The unconditional branch is the canvas with the prompt masked, same positions, same mask: so
    the first step's guided logits are computed by hand from two plain forwards."""
    prompt = prompt_of(5, seed=4)
    seen = []
    block_generate(dense, prompt, gen_length=8, block_length=8, steps=8, threshold=None, eos_id=None, mask_id=MASK,
                   cfg_scale=2.0, cache=False, callback=lambda s: seen.append(s))
    x = torch.full((1, 8), MASK)
    x[0, :5] = prompt[0]
    mask = block_causal_mask(8, 8)[None, None]
    cond = dense(x, attention_mask=mask).logits
    uncond = dense(torch.full((1, 8), MASK), attention_mask=mask).logits
    guided = uncond + 3.0 * (cond - uncond)
    first = seen[0].committed[0].nonzero().flatten().tolist()
    assert first == [5 + int(torch.softmax(guided[0, 5:], -1).max(-1).values.argmax())]


def test_reuse_uncond_runs_the_unconditional_rows_once_per_block(dense, widths):
    kw = dict(gen_length=16, block_length=8, steps=4, threshold=None, eos_id=None, mask_id=MASK, cfg_scale=1.0)
    out = block_generate(dense, prompt_of(8), reuse_uncond=True, **kw)
    assert len(widths) == 4 * 2 + 2      # 4 steps per block, + 1 unconditional pass per block
    assert out.shape == (1, 24) and not (out == MASK).any()


def test_threshold_commit_rule():
    conf = torch.tensor([[0.9, 0.2, float("-inf"), 0.8], [0.1, 0.3, 0.2, float("-inf")]])
    assert threshold_commit(conf, 2, 0.5).tolist() == [[True, False, False, True], [False, True, True, False]]
    assert threshold_commit(conf, 1, 0.85).tolist()[0] == [True, False, False, False]
    assert threshold_commit(conf, 0, 0.95).sum() == 0
    assert threshold_commit(conf, 5, None).tolist() == [[True, True, False, True], [True, True, True, False]]


@pytest.mark.parametrize("bad, option", [(dict(steps=0), "steps"), (dict(block_length=0), "block_length"),
                                         (dict(threshold=1.5), "threshold"), (dict(minimal_topk=100), "minimal_topk"),
                                         (dict(top_p=0.0), "top_p"), (dict(cfg_scale=float("nan")), "cfg_scale"),
                                         (dict(gen_length=600), "prompt")])
def test_bad_options_name_themselves(dense, bad, option):
    with pytest.raises(OptionError) as e:
        block_generate(dense, prompt_of(5), **dict(gen_length=16, mask_id=MASK) | bad)
    assert e.value.option == option


def test_unmask_generate_dispatches_on_the_model_family(tiny_llada2_checkpoint):
    import unmask

    model, _ = unmask.load(tiny_llada2_checkpoint)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    kw = dict(gen_length=16, block_length=8, steps=4, threshold=0.9, mask_id=383, eos_id=381, cfg_scale=0.5)
    assert torch.equal(unmask.generate(model, prompt, **kw), block_generate(model, prompt, **kw))
    with pytest.raises(TypeError, match="remasking"):
        unmask.generate(model, prompt, remasking="random", **kw)


def test_cli_generates_with_a_block_diffusion_checkpoint(tiny_llada2_checkpoint, capsys):
    import unmask
    from unmask.cli import main
    from unmask.sampling.text import generate_text

    args = ["--gen-length", "16", "--cfg-scale", "0.5", "--seed", "0"]
    assert main(["generate", "hi", "--model", str(tiny_llada2_checkpoint), "--chat", *args]) == 0
    model, tok = unmask.load(tiny_llada2_checkpoint)
    expected = generate_text(model, tok, ["hi"], chat=True, gen_length=16, block_length=32, steps=32,
                             threshold=0.95, cfg_scale=0.5, eos_early_stop=True,
                             generator=torch.Generator().manual_seed(0))[0]
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "hi", "--model", str(tiny_llada2_checkpoint), "--remasking", "random"]) == 2
    assert "remasking does not apply to block-diffusion (LLaDA2.x) models" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny_llada2_checkpoint), "--cache", "dual"]) == 2


def test_bench_times_block_models_against_the_uncached_public_algorithm(tmp_path, capsys):
    import json

    from unmask.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--shape", "llada2-tiny", "--batch-sizes", "1", "2", "--prompt-len", "10", "--gen-length", "24",
            "--block-length", "8", "--repeats", "1", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    rows = {(r["batch"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    for batch in (1, 2):
        assert rows[batch, "public algorithm, no cache (baseline)"]["agreement"] == 1.0
        assert rows[batch, "block cache"]["agreement"] == 1.0          # the cache is exact
        assert rows[batch, "block cache+cfg"]["agreement"] == 1.0      # against uncached CFG
        assert rows[batch, "block cache+cfg reuse"]["agreement"] is not None
    assert main(args[:-2] + ["--modes", "dual"]) == 2
    assert "mode 'dual' is not a mode of block-diffusion (LLaDA2.x) models" in capsys.readouterr().err


def test_unmask_eval_scores_a_block_diffusion_checkpoint(tiny_llada2_checkpoint, tmp_path):
    import json

    from unmask.cli import main
    from unmask.eval import DEFAULT_TASKS

    assert main(["eval", "--model", str(tiny_llada2_checkpoint), "--limit", "2", "--cfg-scale", "0", "1",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {t["task"] for t in results["results"]} == set(DEFAULT_TASKS)
    assert results["meta"]["mode"] == "chain"   # the exact chain rule under the block-causal mask
