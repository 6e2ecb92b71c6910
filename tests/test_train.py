"""The trainer: objectives against hand computations, data, exact resume, checkpoints, DDP."""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import socket
from pathlib import Path

import pytest
import torch

from unmask.models import CheckpointError, MaskedLMOutput, load_model, load_tokenizer
from unmask.train import Batch, TrainConfig, mdm_bound, pretrain_loss, sft_loss
from unmask.train.data import BatchStream, Rows, build_rows, pack, read_records
from unmask.train.objective import document_attention
from unmask.train.trainer import Trainer, train

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
    whole = train(tiny(tmp_path / "a", tokenizer_dir, corpus, grad_accum=2))
    first = train(tiny(tmp_path / "b", tokenizer_dir, corpus, grad_accum=2, stop_at=4))
    assert first.step == 4 and first.checkpoint.name == "step-000004"
    rest = train(tiny(tmp_path / "b", tokenizer_dir, corpus, grad_accum=2, resume="auto"))
    assert first.losses == {s: whole.losses[s] for s in range(1, 5)}
    assert rest.losses == {s: whole.losses[s] for s in range(5, 9)}  # bit-exact, not approx
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
             "unsealed": (lambda d: (d / "manifest.json").unlink(), "manifest")}
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
    cfg = command.config_from_args(parser.parse_args(["train", "--config", str(recipe), "--max-steps", "9", "--resume"]))
    assert (cfg.lr, cfg.max_steps, cfg.sft, cfg.resume, cfg.data) == (1e-3, 9, True, "auto", ["x.txt"])
    recipe.write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        command.config_from_args(parser.parse_args(["train", "--config", str(recipe)]))


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
    trainer.close()


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
