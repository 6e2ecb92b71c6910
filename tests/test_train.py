"""The trainer: objectives against hand computations, data, exact resume, checkpoints, DDP."""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import socket
import weakref
from pathlib import Path

import pytest
import torch

from unmask.models import CheckpointError, MaskedLMOutput, load_model, load_tokenizer
from unmask.train import Batch, TrainConfig, mdm_bound, pretrain_loss, sft_loss
from unmask.train.data import BatchStream, Rows, build_rows, pack, read_records
from unmask.train.objective import document_attention
from unmask.train.trainer import Trainer, train

from resume_check import whole_and_resumed

torch.set_num_threads(1)

SPECIALS = ["<|endoftext|>", "<|mask|>", "<|user|>", "<|assistant|>", "<|eot|>"]
WORDS = "the a cat dog sat ran on under mat rug red blue big small".split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A character-level Hugging Face tokenizer (BPE with no merges) with a chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(WORDS) + " .?\n" + "abcdefghijklmnopqrstuvwxyz"))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|mask|>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|eot|>"])
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eot|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d


def _sentence(rng: random.Random) -> str:
    a, b = rng.sample(WORDS[:2], 1)[0], rng.choice(["cat", "dog"])
    return f"{a} {rng.choice(['red', 'blue', 'big', 'small'])} {b} {rng.choice(['sat', 'ran'])} on the mat."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text("\n\n".join(" ".join(_sentence(rng) for _ in range(3)) for _ in range(200)))
    return d / "train.txt"


def tiny(tmp_path: Path, tokenizer_dir: Path, data: Path, **overrides) -> TrainConfig:
    settings = dict(data=[str(data)], tokenizer=str(tokenizer_dir), out_dir=str(tmp_path / "run"),
                    d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8, lr=3e-3, min_lr=3e-4,
                    warmup=5, max_steps=8, eval_every=4, eval_batches=2, eval_mc_samples=2, save_every=100,
                    heldout_frac=0.05, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


class UniformModel(torch.nn.Module):
    """Equal logits everywhere (so every cross-entropy is log V); records the inputs it saw."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.seen = vocab, []

    def forward(self, input_ids):
        self.seen.append(input_ids.clone())
        return MaskedLMOutput(torch.zeros(*input_ids.shape, self.vocab))


# ---- objectives --------------------------------------------------------------------------------

MASK, V = 9, 10


def test_pretrain_loss_weights_each_masked_token_by_one_over_p_mask():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [1, 1, 2, 2, 3, 3]])
    model = UniformModel(V)
    loss = pretrain_loss(model, ids, MASK, torch.Generator().manual_seed(7), random_length_prob=0.0)
    # Hand computation, drawing in the documented order: cut decision, t per row, u per token.
    g = torch.Generator().manual_seed(7)
    torch.rand((), generator=g)
    t = torch.rand(3, generator=g)
    u = torch.rand(ids.shape, generator=g)
    p = (1 - 1e-3) * t + 1e-3
    masked = u < p[:, None]
    expected = sum(math.log(V) / p[b].item() for b in range(3) for i in range(6) if masked[b, i]) / (3 * 6)
    assert torch.equal(model.seen[0], torch.where(masked, MASK, ids))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pretrain_loss_random_length_cuts_the_batch():
    model = UniformModel(V)
    ids = torch.randint(0, 8, (2, 50))
    pretrain_loss(model, ids, MASK, torch.Generator().manual_seed(0), random_length_prob=1.0)
    assert model.seen[0].shape[0] == 2 and 1 <= model.seen[0].shape[1] < 50


def test_sft_loss_never_masks_prompt_and_normalises_by_response_length():
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 8, 0]])
    prompt = torch.tensor([2, 3])
    model = UniformModel(V)
    loss = sft_loss(model, ids, prompt, MASK, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.rand(2, generator=g)
    u = torch.rand(ids.shape, generator=g)
    p = (1 - 1e-3) * t + 1e-3
    response = torch.arange(6)[None] >= prompt[:, None]
    masked = (u < p[:, None]) & response
    rows = [sum(math.log(V) / p[b].item() for i in range(6) if masked[b, i]) / int(response[b].sum()) for b in range(2)]
    seen = model.seen[0]
    assert torch.equal(seen[~response], ids[~response])  # the prompt is intact
    assert torch.equal(seen, torch.where(masked, MASK, ids))
    assert loss.item() == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_cond_drop_masks_the_whole_prompt_without_scoring_it():
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 8, 0]])
    prompt = torch.tensor([2, 3])
    plain, dropped = UniformModel(V), UniformModel(V)
    a = sft_loss(plain, ids, prompt, MASK, torch.Generator().manual_seed(3))
    b = sft_loss(dropped, ids, prompt, MASK, torch.Generator().manual_seed(3), cond_drop=1.0)
    response = torch.arange(6)[None] >= prompt[:, None]
    assert (dropped.seen[0][~response] == MASK).all()
    assert torch.equal(dropped.seen[0][response], plain.seen[0][response])
    assert a.item() == b.item()


def test_mdm_bound_is_a_fixed_protocol():
    batches = [Batch(torch.randint(0, 8, (4, 16)))]
    a = mdm_bound(UniformModel(V), batches, MASK, mc_samples=16, seed=0)
    b = mdm_bound(UniformModel(V), batches, MASK, mc_samples=16, seed=0)
    assert a.nats_per_token == b.nats_per_token
    assert a.nats_per_token == pytest.approx(math.log(V), rel=0.15)  # E[1{masked}/p_mask] = 1 per token
    assert a.perplexity_bound == pytest.approx(math.exp(a.nats_per_token))


# ---- data --------------------------------------------------------------------------------------

def test_sft_rows_keep_prompt_lengths_and_pad_with_eos(tmp_path, tokenizer_dir):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "red cat?", "response": "sat."}\n'
                    '{"messages": [{"role": "user", "content": "dog?"}, {"role": "assistant", "content": "ran."}]}\n')
    tok = load_tokenizer(tokenizer_dir)
    rows, held, info = build_rows([str(data)], tok, 40, 0.0, tmp_path / "cache")
    assert info["sft"] and held is None and len(rows) == 2
    first = rows.input_ids[0].tolist()
    prompt = tok.apply_chat_template([{"role": "user", "content": "red cat?"}], add_generation_prompt=True, tokenize=False)
    assert rows.prompt_lengths[0] == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok.decode(first[rows.prompt_lengths[0]:]).replace(" ", "").startswith("sat.<|eot|><|endoftext|>")
    assert first[-1] == tok.eos_token_id
    assert list((tmp_path / "cache").iterdir())  # tokenised once, cached


def test_pack_numbers_documents_and_document_attention_restarts_positions():
    rows = pack([[5, 6, 7], [8, 9], [10, 11, 12, 13]], 6, eos_id=0, segments=True)
    assert rows.input_ids.tolist() == [[5, 6, 7, 0, 8, 9], [0, 10, 11, 12, 13, 0]]
    assert rows.segments.tolist() == [[0, 0, 0, 0, 1, 1], [1, 2, 2, 2, 2, 2]]
    mask, positions = document_attention(rows.segments)
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]
    assert mask.shape == (2, 1, 6, 6) and mask[0, 0, 0].tolist() == [True] * 4 + [False] * 2
    assert pack([[5, 6, 7]], 4, eos_id=0).segments is None


def test_a_packed_document_with_document_attention_reads_as_if_alone():
    from unmask.models import MaskedDiffusionLM, ModelConfig

    cfg = ModelConfig(layout="llada", vocab_size=20, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                      mlp_hidden_size=64, max_seq_len=16, mask_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    model = MaskedDiffusionLM(cfg).eval()
    ids = torch.tensor([[5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 0]])
    mask, positions = document_attention(torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]]))
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(torch.tensor([[8, 9, 0]])).logits
        plain = model(ids).logits
    torch.testing.assert_close(packed[0, 4:7], alone[0], rtol=0, atol=1e-5)
    assert (plain[0, 4:7] - alone[0]).abs().max() > 1e-3  # without it, the neighbours leak in


def test_pretrain_loss_passes_document_attention_to_the_model():
    seen = {}

    class Recorder(UniformModel):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            seen.update(mask=attention_mask, positions=position_ids)
            return super().forward(input_ids)

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    segments = torch.tensor([[0, 0, 1, 1, 1, 2]])
    pretrain_loss(Recorder(V), ids, MASK, torch.Generator().manual_seed(0), random_length_prob=0.0,
                  segments=segments)
    assert seen["positions"].tolist() == [[0, 1, 0, 1, 2, 0]] and seen["mask"].shape == (1, 1, 6, 6)


def test_txt_documents_are_blank_line_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\n\nthree\n")
    assert read_records(f) == ["one\ntwo", "three"]


def test_batch_stream_resumes_at_its_position():
    rows = Rows(torch.arange(30).view(10, 3))
    a = BatchStream(rows, 4, seed=1)
    for _ in range(3):
        a.next()
    b = BatchStream(rows, 4, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.next().input_ids, b.next().input_ids) for _ in range(5))
    r0, r1 = BatchStream(rows, 2, seed=1, rank=0, world_size=2), BatchStream(rows, 2, seed=1, rank=1, world_size=2)
    seen = torch.cat([r0.next().input_ids, r1.next().input_ids])[:, 0].tolist()
    assert len(set(seen)) == 4  # ranks read disjoint rows of a global batch


# ---- training ----------------------------------------------------------------------------------

def test_loss_decreases_and_checkpoint_loads_back(tmp_path, tokenizer_dir, corpus):
    trainer = Trainer(tiny(tmp_path, tokenizer_dir, corpus, max_steps=300, eval_every=100))
    result = trainer.run()
    losses = list(result.losses.values())
    assert sum(losses[-50:]) / 50 < 0.7 * sum(losses[:10]) / 10  # the MDM loss is noisy: compare means
    assert result.evals[300] < result.evals[100] < math.log(len(load_tokenizer(tokenizer_dir)))
    run = Path(trainer.cfg.out_dir)
    assert (run / "metrics.jsonl").exists() and (run / "loss_curve.png").exists()
    assert (run / "latest").read_text().strip() == "step-000300" == result.checkpoint.name
    loaded = load_model(result.checkpoint)
    assert load_tokenizer(result.checkpoint).mask_token_id == loaded.config.mask_token_id
    ids = torch.randint(0, loaded.config.vocab_size, (2, 32))
    trainer.core.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trainer.core(ids).logits)


def test_console_shows_held_out_loss_and_bad_inputs_leave_no_run_directory(tmp_path, tokenizer_dir, corpus, capsys):
    Trainer(tiny(tmp_path, tokenizer_dir, corpus, max_steps=4, eval_every=2)).run()
    assert "step 4: held-out bound" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        Trainer(tiny(tmp_path / "b", tokenizer_dir, tmp_path / "missing.txt"))
    assert not (tmp_path / "b").exists()


def test_document_attention_and_tied_embeddings_train_and_load_back(tmp_path, tokenizer_dir, corpus):
    trainer = Trainer(tiny(tmp_path, tokenizer_dir, corpus, doc_attention=True, tie_embeddings=True, max_steps=4))
    assert trainer.stream.rows.segments is not None and trainer.heldout[0].segments is not None
    result = trainer.run()
    loaded = load_model(result.checkpoint)
    assert loaded.config.tie_embeddings and loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, loaded.config.vocab_size, (2, 32))
    trainer.core.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trainer.core(ids).logits)
    with pytest.raises(ValueError, match="doc_attention"):
        tiny(tmp_path, tokenizer_dir, corpus, doc_attention=True, sft=True)


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tokenizer_dir, corpus):
    whole, first, rest = whole_and_resumed(lambda run, **kw: tiny(tmp_path / run, tokenizer_dir, corpus,
                                                                  grad_accum=2, **kw))
    assert first.step == 4 and first.checkpoint.name == "step-000004"
    assert rest.evals[8] == whole.evals[8]


def test_ctrl_c_checkpoints_and_stops_cleanly(tmp_path, tokenizer_dir, corpus, monkeypatch):
    import signal

    step = Trainer.train_step

    def interrupted_at_3(self):
        out = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_3)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also when run under nohup
    result = train(tiny(tmp_path, tokenizer_dir, corpus, eval_every=0))
    assert result.interrupted and result.step == 3 and result.checkpoint.name == "step-000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_damaged_checkpoints_are_refused(tmp_path, tokenizer_dir, corpus):
    cfg = tiny(tmp_path, tokenizer_dir, corpus, max_steps=2, eval_every=0)
    good = train(cfg).checkpoint
    with pytest.raises(ValueError, match="already holds a run"):  # never silently overwrite a run
        train(cfg)

    def damaged(name: str, damage) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        damage(d)
        return d

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])

    def flip(d):
        f = d / "trainer_state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))

    cases = {"truncated": (truncate, "truncated"), "flipped": (flip, "sha256"),
             "unsealed": (lambda d: (d / "manifest.json").unlink(), "manifest"),
             "list manifest": (lambda d: (d / "manifest.json").write_text("[]"), "must hold a JSON object"),
             "no files": (lambda d: (d / "manifest.json").write_text('{"step": 2}'), "damaged")}
    for name, (damage, words) in cases.items():
        bad = damaged(name, damage)
        with pytest.raises(CheckpointError, match=words):
            train(tiny(tmp_path, tokenizer_dir, corpus, max_steps=4, eval_every=0, resume=str(bad)))


def test_model_shape_from_preset_or_fields_with_tokenizer_ids(tmp_path, tokenizer_dir):
    from unmask.train.trainer import model_config

    tok = load_tokenizer(tokenizer_dir)
    small = model_config(tiny(tmp_path, tokenizer_dir, "x.txt"), tok)
    assert (small.vocab_size, small.mask_token_id, small.eot_token_id) == (len(tok), 1, 4)
    assert small.mlp_hidden_size == 96 and small.max_seq_len == 32
    big = model_config(tiny(tmp_path, tokenizer_dir, "x.txt", preset="llada-8b"), tok)  # config only, no weights
    assert (big.d_model, big.n_layers, big.vocab_size, big.max_seq_len) == (4096, 32, len(tok), 4096)


def test_recipe_toml_then_flags(tmp_path):
    from unmask.commands import train as command

    recipe = tmp_path / "r.toml"
    recipe.write_text('data = ["x.txt"]\ntokenizer = "tok"\nlr = 1e-3\nmax_steps = 7\nsft = true\n')
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    flags = ["--max-steps", "9", "--resume", "--layout", "llada2_moe", "--n-experts", "4", "--block-length", "16"]
    cfg = command.config_from_args(parser.parse_args(["train", "--config", str(recipe), *flags]))
    assert (cfg.lr, cfg.max_steps, cfg.sft, cfg.resume, cfg.data) == (1e-3, 9, True, "auto", ["x.txt"])
    assert (cfg.layout, cfg.n_experts, cfg.block_length) == ("llada2_moe", 4, 16)
    recipe.write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        command.config_from_args(parser.parse_args(["train", "--config", str(recipe)]))


# ---- block diffusion (LLaDA2) ------------------------------------------------------------------

def _bd3_mask_by_hand(positions: list[int], documents: list[int], b: int) -> torch.Tensor:
    """BD3-LM's mask over [noisy | clean], written out one (query, key) pair at a time."""
    L = len(positions)
    mask = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for i in range(2 * L):
        for j in range(2 * L):
            if documents[i % L] != documents[j % L]:
                continue
            bi, bj = positions[i % L] // b, positions[j % L] // b
            if i < L and j < L:
                mask[i, j] = bi == bj           # a noisy block sees itself
            elif i < L:
                mask[i, j] = bj < bi            # ... and the clean blocks before it
            elif j >= L:
                mask[i, j] = bj <= bi           # the clean copy is block-causal
    return mask                                 # (clean queries never see noisy keys)


def test_block_diffusion_mask_is_bd3s_and_composes_with_documents():
    from unmask.sampling.blocks import block_causal_mask
    from unmask.train.objective import attention_for

    ids = torch.zeros(1, 7, dtype=torch.long)
    plain = attention_for(ids, block_length=3)
    assert torch.equal(plain.mask[0, 0], _bd3_mask_by_hand(list(range(7)), [0] * 7, 3))
    assert torch.equal(plain.mask[0, 0, 7:, 7:], block_causal_mask(7, 3))  # the decoding mask
    assert plain.positions.tolist() == [list(range(7)) * 2] and plain.blocks.tolist() == [[0, 0, 0, 1, 1, 1, 2]]

    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2]])
    packed = attention_for(torch.zeros(1, 10, dtype=torch.long), segments, block_length=2)
    positions = [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert torch.equal(packed.mask[0, 0], _bd3_mask_by_hand(positions, segments[0].tolist(), 2))
    assert packed.positions.tolist() == [positions * 2]
    assert packed.blocks.tolist() == [[0, 0, 1, 1, 2, 3, 3, 4, 5, 5]]  # each document starts a block


class Recorder(UniformModel):
    """UniformModel that also takes and records the keyword arguments the objectives pass."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_slice=None):
        self.kwargs = dict(mask=attention_mask, positions=position_ids, logits_slice=logits_slice)
        logits = super().forward(input_ids).logits
        return MaskedLMOutput(logits if logits_slice is None else logits[:, logits_slice])


def test_block_diffusion_loss_draws_one_time_per_block_and_reads_noisy_then_clean():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    model = Recorder(V)
    loss = pretrain_loss(model, ids, MASK, torch.Generator().manual_seed(7), random_length_prob=0.0, block_length=4)
    # Hand computation, drawing in the documented order: cut decision, t per block, u per token.
    g = torch.Generator().manual_seed(7)
    torch.rand((), generator=g)
    t = torch.rand(ids.shape, generator=g)[:, [0, 0, 0, 0, 1, 1]]  # blocks [0, 4) and [4, 6)
    u = torch.rand(ids.shape, generator=g)
    p = (1 - 1e-3) * t + 1e-3
    masked = u < p
    expected = sum(math.log(V) / p[b, i].item() for b in range(2) for i in range(6) if masked[b, i]) / (2 * 6)
    assert torch.equal(model.seen[0], torch.cat([torch.where(masked, MASK, ids), ids], dim=1))
    assert model.kwargs["mask"].shape == (1, 1, 12, 12) and model.kwargs["logits_slice"] == slice(0, 6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_block_diffusion_sft_keeps_the_prompt_and_cond_drop_masks_it_in_both_copies():
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 8, 0]])
    prompt = torch.tensor([2, 3])
    response = torch.arange(6)[None] >= prompt[:, None]
    plain, dropped = Recorder(V), Recorder(V)
    a = sft_loss(plain, ids, prompt, MASK, torch.Generator().manual_seed(3), block_length=2)
    b = sft_loss(dropped, ids, prompt, MASK, torch.Generator().manual_seed(3), cond_drop=1.0, block_length=2)
    noisy, clean = plain.seen[0].split(6, dim=1)
    assert torch.equal(noisy[~response], ids[~response]) and torch.equal(clean, ids)
    assert (noisy[response] == MASK).any()
    noisy_dropped, clean_dropped = dropped.seen[0].split(6, dim=1)
    assert (noisy_dropped[~response] == MASK).all() and (clean_dropped[~response] == MASK).all()
    assert torch.equal(noisy_dropped[response], noisy[response]) and torch.equal(clean_dropped[response], ids[response])
    assert a.item() == b.item()


def _tiny_llada2(**changes):
    from unmask.models import MaskedDiffusionLM, ModelConfig
    from unmask.train.trainer import init_weights

    cfg = ModelConfig(layout="llada2_moe", vocab_size=20, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      mlp_hidden_size=64, max_seq_len=32, partial_rotary_factor=0.5, qk_norm=True, n_experts=4,
                      experts_per_token=2, expert_hidden_size=16, norm_topk_prob=True, shared_expert_hidden_size=16,
                      expert_bias=True, router="sigmoid", moe_layers=[False, True], mask_token_id=1,
                      eos_token_id=0, **changes)
    torch.manual_seed(0)
    model = MaskedDiffusionLM(cfg)
    init_weights(model)
    with torch.no_grad():  # a bias that changes which experts win, as a trained one would
        model.blocks[1].mlp.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    return model.eval()


def test_the_objective_denoises_each_block_as_block_decoding_does():
    """Block k's logits in the one training pass equal a decoding pass over the clean blocks < k and
    the noisy block k under the block-causal mask: training conditions on what decoding sees."""
    from unmask.sampling.blocks import block_causal_mask
    from unmask.train.objective import attention_for

    model, b = _tiny_llada2(), 4
    ids = torch.randint(2, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    noisy = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5, 1)
    with torch.no_grad():
        trained = attention_for(ids, block_length=b).logits(model, noisy, ids)
        for k in range(3):
            window = torch.cat([ids[:, :k * b], noisy[:, k * b:(k + 1) * b]], dim=1)
            decoded = model(window, attention_mask=block_causal_mask((k + 1) * b, b)[None, None]).logits
            torch.testing.assert_close(trained[:, k * b:(k + 1) * b], decoded[:, k * b:], rtol=0, atol=1e-5)


def test_a_packed_document_under_block_diffusion_reads_as_if_alone():
    from unmask.train.objective import attention_for

    model = _tiny_llada2()
    ids = torch.tensor([[5, 6, 7, 0, 8, 9, 10, 11, 12, 0, 13, 14]])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]])
    noisy = ids.clone()
    noisy[0, [1, 5, 7, 8, 11]] = 1
    doc = slice(4, 10)
    with torch.no_grad():
        packed = attention_for(ids, segments, block_length=4).logits(model, noisy, ids)
        alone = attention_for(ids[:, doc], block_length=4).logits(model, noisy[:, doc], ids[:, doc])
        plain = attention_for(ids, block_length=4).logits(model, noisy, ids)
    torch.testing.assert_close(packed[:, doc], alone, rtol=0, atol=1e-5)
    assert (plain[:, doc] - alone).abs().max() > 1e-3  # without document attention, the neighbours leak in


def llada2(tmp_path: Path, tokenizer_dir: Path, data: Path, **overrides) -> TrainConfig:
    """`tiny` as a LLaDA2 MoE: a dense layer, then an MoE layer of 4 experts (top 2) and a shared one."""
    settings = dict(layout="llada2_moe", n_experts=4, experts_per_token=2, shared_experts=1, dense_layers=1,
                    block_length=8)
    return tiny(tmp_path, tokenizer_dir, data, **{**settings, **overrides})


def test_block_length_defaults_to_llada2s_for_its_layout(tmp_path, tokenizer_dir):
    from unmask.train.trainer import block_length_for, model_config

    tok = load_tokenizer(tokenizer_dir)
    cfg = llada2(tmp_path, tokenizer_dir, "x.txt", block_length=None)
    shape = model_config(cfg, tok)
    assert (shape.layout, shape.moe_layers, shape.router, shape.expert_bias, shape.norm_topk_prob) == \
        ("llada2_moe", [False, True], "sigmoid", True, True)
    widths = (shape.rotary_dim, shape.expert_hidden_size, shape.shared_expert_hidden_size)
    assert shape.qk_norm and widths == (8, 48, 48)
    assert block_length_for(cfg, shape) == 32
    assert block_length_for(llada2(tmp_path, tokenizer_dir, "x.txt", block_length=0), shape) is None
    plain = tiny(tmp_path, tokenizer_dir, "x.txt")
    assert block_length_for(plain, model_config(plain, tok)) is None
    with pytest.raises(ValueError, match="no experts"):
        model_config(tiny(tmp_path, tokenizer_dir, "x.txt", n_experts=4), tok)
    with pytest.raises(ValueError, match="block_length"):
        tiny(tmp_path, tokenizer_dir, "x.txt", block_length=-1)


def test_llada2_moe_learns_block_causally_and_its_checkpoint_decodes(tmp_path, tokenizer_dir, corpus):
    import unmask
    from unmask.train.trainer import build_model

    cfg = llada2(tmp_path, tokenizer_dir, corpus, max_steps=60, eval_every=30)
    trainer = Trainer(cfg)
    assert trainer.block_length == 8
    result = trainer.run()
    losses = list(result.losses.values())
    assert sum(losses[-10:]) < 0.85 * sum(losses[:10])
    assert result.evals[60] < result.evals[30] < math.log(len(load_tokenizer(tokenizer_dir)))
    router = trainer.core.blocks[1].mlp
    initial = build_model(cfg, load_tokenizer(tokenizer_dir)).blocks[1].mlp
    assert not torch.equal(router.router.weight, initial.router.weight)  # the sigmoid router learns
    assert not router.expert_bias.any()  # a buffer: LLaDA2 moves it by its balancing rule, not by gradients

    loaded = load_model(result.checkpoint)
    assert loaded.config.layout == "llada2_moe" and loaded.config.moe_layers == [False, True]
    ids = torch.randint(0, loaded.config.vocab_size, (2, 32))
    from unmask.sampling.blocks import block_causal_mask
    trainer.core.eval()
    with torch.no_grad():
        mask = block_causal_mask(32, 8)[None, None]
        assert torch.equal(loaded(ids, attention_mask=mask).logits, trainer.core(ids, attention_mask=mask).logits)
    tok = load_tokenizer(result.checkpoint)
    prompt = torch.tensor([tok("the red cat", add_special_tokens=False)["input_ids"]])
    out = unmask.generate(loaded, prompt, gen_length=16, block_length=8, steps=8)  # block_generate for LLaDA2
    assert out.shape == (1, prompt.shape[1] + 16) and not (out == loaded.config.mask_token_id).any()


def test_llada2_block_diffusion_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tokenizer_dir, corpus):
    def cfg(run: str, **kw) -> TrainConfig:
        return llada2(tmp_path / run, tokenizer_dir, corpus, grad_accum=2, doc_attention=True, **kw)

    whole, _, rest = whole_and_resumed(cfg)
    assert rest.evals[8] == whole.evals[8]


def test_llada2_block_diffusion_sft_with_cond_drop_trains(tmp_path, tokenizer_dir):
    rng = random.Random(0)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(f'{{"prompt": "{rng.choice(["red", "blue"])} {rng.choice(["cat", "dog"])}?", '
                            f'"response": "{rng.choice(["sat", "ran"])} on the mat."}}\n' for _ in range(120)))
    trainer = Trainer(llada2(tmp_path, tokenizer_dir, data, sft=True, cond_drop=0.3, max_steps=4, eval_every=2,
                             heldout_frac=0.1))
    result = trainer.run()
    assert trainer.heldout and trainer.heldout[0].prompt_lengths is not None
    assert all(math.isfinite(v) for v in [*result.losses.values(), *result.evals.values()])


# ---- distributed -------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, cfg: TrainConfig, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    result = trainer.run()
    weights = get_model_state_dict(trainer.core, options=StateDictOptions(full_state_dict=True))  # FSDP: unshard
    weights = {k: v.detach().cpu() for k, v in weights.items()}
    torch.save({"weights": weights, "losses": result.losses}, f"{out}/rank{rank}.pt")
    ddp = weakref.ref(trainer.ddp) if trainer.ddp is not None else None
    trainer.close()
    # DDP's reducer is freed by close(), not at exit after the group is gone (a GIL deadlock in gloo)
    assert ddp is None or ddp() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfg: TrainConfig, out: Path) -> dict:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), cfg, str(out)), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert r0["weights"].keys() == r1["weights"].keys()
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])  # ranks agree
    assert r0["losses"] == r1["losses"]  # the logged loss is the all-reduced mean
    return r0


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_agree_learn_and_resume(tmp_path, tokenizer_dir, corpus, fsdp):
    def cfg(run: str, **kw) -> TrainConfig:
        return tiny(tmp_path / run, tokenizer_dir, corpus, max_steps=30, batch_size=4, eval_every=0, fsdp=fsdp, **kw)

    whole = _spawn(cfg("a"), tmp_path)
    losses = list(whole["losses"].values())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    saved = load_model(Path(cfg("a").out_dir) / "step-000030")
    assert all(torch.equal(saved.state_dict()[k], whole["weights"][k]) for k in whole["weights"])
    _spawn(cfg("b", stop_at=15), tmp_path)
    rest = _spawn(cfg("b", resume="auto"), tmp_path)
    assert rest["losses"] == {s: whole["losses"][s] for s in range(16, 31)}
    assert all(torch.equal(rest["weights"][k], whole["weights"][k]) for k in whole["weights"])


def _fail_step_4(kind: str, monkeypatch) -> None:
    """Make writing the step-4 checkpoint fail as each writer reports a full or read-only disk."""
    import errno
    import tempfile

    from safetensors import SafetensorError

    from unmask.models import loading
    from unmask.train import checkpoint

    def failing(original, raises, where=lambda *a, **k: str(a[1] if len(a) > 1 else a[0])):
        def write(*args, **kwargs):
            if "step-000004" in where(*args, **kwargs):
                raise raises
            return original(*args, **kwargs)
        return write

    if kind == "enospc":   # an OSError from our own code (hashing the files)
        monkeypatch.setattr(checkpoint, "_sha256", failing(checkpoint._sha256, OSError(
            errno.ENOSPC, "No space left on device", "run/.tmp-step-000004/model.safetensors"),
            lambda path: str(path)))
    elif kind == "safetensors":
        monkeypatch.setattr(loading, "save_file", failing(loading.save_file, SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")))
    elif kind == "torch":
        monkeypatch.setattr(torch, "save", failing(torch.save, RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/3: file "
            "write failed")))
    else:   # the run directory became read-only
        monkeypatch.setattr(tempfile, "mkdtemp", failing(tempfile.mkdtemp, OSError(
            errno.EROFS, "Read-only file system", "run/.tmp-step-000004"), lambda **k: k["prefix"]))


@pytest.mark.parametrize("kind, said", [("enospc", "no space left on device"),
                                        ("safetensors", "no space left on device"),
                                        ("torch", "no space left on device"),
                                        ("erofs", "read-only file system")])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_the_last_checkpoint_intact(
        tmp_path, tokenizer_dir, corpus, monkeypatch, capsys, kind, said):
    """Before: only an OSError ENOSPC was one line; safetensors' and torch's errors for a full disk,
    and a read-only directory, were tracebacks."""
    from unmask import cli

    run_dir = tmp_path / "run"
    args = ["train", "--tokenizer", str(tokenizer_dir), "--data", str(corpus), "--out-dir", str(run_dir),
            "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--seq-len", "32", "--batch-size", "8",
            "--max-steps", "4", "--eval-every", "0", "--save-every", "2", "--no-progress"]
    with monkeypatch.context() as patched:
        _fail_step_4(kind, patched)
        assert cli.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("unmask train: error: " + said) and "--resume" in errors[0], err
    assert f"{run_dir / 'step-000002'}, is intact" in err
    assert (run_dir / "latest").read_text().strip() == "step-000002"
    assert not list(run_dir.glob(".tmp-*"))   # the partial checkpoint was removed
    assert cli.main(args + ["--resume"]) == 0
    assert (run_dir / "latest").read_text().strip() == "step-000004"


def test_resaving_a_step_keeps_latest_on_a_complete_checkpoint_whenever_it_crashes(tmp_path):
    """Re-save step 4 (as after resuming from step 2), crashing (os._exit, so no cleanup runs) at
    each file-system operation in turn: `latest` must always name a complete checkpoint, old or new.
    Before: step-000004 was deleted before the new one was renamed in, with `latest` naming it."""
    from unmask.models.loading import resolve_checkpoint_dir
    from unmask.train import checkpoint

    def writes(text):
        return lambda d: (d / "weights.txt").write_text(text)

    base = tmp_path / "base"
    base.mkdir()
    checkpoint.write_checkpoint(base, 2, writes("two"), keep_last=0)
    checkpoint.write_checkpoint(base, 4, writes("old four"), keep_last=0)
    operations = [(os, "replace"), (os, "link"), (shutil, "rmtree"), (shutil, "copytree"), (checkpoint, "_fsync")]
    seen = set()
    for crash_at in range(1, 100):
        run = tmp_path / f"crash-{crash_at}"
        shutil.copytree(base, run)
        pid = os.fork()
        if pid == 0:   # the child re-saves step 4 and dies at the crash_at-th operation
            calls = [0]

            def crashing(original):
                def operation(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == crash_at:
                        os._exit(17)
                    return original(*args, **kwargs)
                return operation

            for module, name in operations:
                setattr(module, name, crashing(getattr(module, name)))
            checkpoint.write_checkpoint(run, 4, writes("new four"), keep_last=0)
            os._exit(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        ckpt = resolve_checkpoint_dir(run)
        checkpoint.verify(ckpt)
        seen.add((ckpt / "weights.txt").read_text())
        if status == 0:
            break
        assert status == 17
    assert status == 0 and crash_at > 5 and seen == {"old four", "new four"}
    assert (run / "latest").read_text().strip() == "step-000004"
    assert (run / "step-000004" / "weights.txt").read_text() == "new four"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000002", "step-000004"]


def test_resume_drops_a_torn_last_metrics_line_and_names_a_bad_one(tmp_path, tokenizer_dir, corpus, capsys):
    """Before: a torn last line of metrics.jsonl (a crash mid-write) blocked --resume with a JSON
    error naming no file, though the checkpoint was intact."""
    import json

    cfg = tiny(tmp_path, tokenizer_dir, corpus, eval_every=0, save_every=2)
    train(tiny(tmp_path, tokenizer_dir, corpus, eval_every=0, save_every=2, stop_at=4))
    log = Path(cfg.out_dir) / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 5, "loss": 2.')
    capsys.readouterr()
    rest = train(tiny(tmp_path, tokenizer_dir, corpus, eval_every=0, save_every=2, resume="auto"))
    assert rest.step == 8 and "dropped its torn last line" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 9))
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + ['{"step": 3, "lo'] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3, is not a metrics row"):
        train(tiny(tmp_path, tokenizer_dir, corpus, eval_every=0, save_every=2, resume="auto", max_steps=10))


def test_max_minutes_checkpoints_and_resumes_exactly(tmp_path, tokenizer_dir, corpus):
    whole = train(tiny(tmp_path / "a", tokenizer_dir, corpus))
    first = train(tiny(tmp_path / "b", tokenizer_dir, corpus, max_minutes=1e-9))   # past the deadline at once
    assert first.interrupted and first.step == 1 and first.checkpoint.name == "step-000001"
    rest = train(tiny(tmp_path / "b", tokenizer_dir, corpus, resume="auto"))
    assert rest.losses == {s: whole.losses[s] for s in range(2, 9)}
    with pytest.raises(ValueError, match="max_minutes"):
        tiny(tmp_path / "c", tokenizer_dir, corpus, max_minutes=-1)
