"""Shared fixtures: a tiny complete checkpoint (weights + tokenizer + chat template) built in tmp.

tests/data/llada-dense-tiny has weights and config only (vocab 384, mask 383, eos 381). The
fixture adds a byte-level tokenizer laid out to fit that vocabulary, so anything that needs
`unmask.load(dir)` — the CLI, the server, the harness adapter — can run end to end on the CPU:

    0..255    the 256 byte symbols (any text round-trips; multi-byte characters span tokens)
    256..258  <|user|> <|assistant|> <|system|>
    259..379  unused fillers
    380       <|eot|>        (end of turn; also written to config.json as eot_token_id)
    381       <|endoftext|>  (EOS and padding)
    382       unused filler
    383       <|mask|>
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

TINY_DIR = Path(__file__).parent / "data" / "llada-dense-tiny"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _byte_tokenizer(vocab_size: int = 384):
    """A byte-level tokenizer with no merges and the special ids listed in the module docstring."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = ["<|user|>", "<|assistant|>", "<|system|>"]
    names += [f"<|unused{i}|>" for i in range(len(alphabet) + len(names), 380)]
    names += ["<|eot|>", "<|endoftext|>", "<|unused382|>", "<|mask|>"]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    assert tok.get_vocab_size() == vocab_size
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 mask_token="<|mask|>", model_max_length=512, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Directory with the tiny LLaDA weights, a fitting tokenizer and a chat template."""
    d = tmp_path_factory.mktemp("tiny-checkpoint")
    for f in TINY_DIR.iterdir():
        if f.name != "reference_logits.pt":
            shutil.copy(f, d / f.name)
    config = json.loads((d / "config.json").read_text())
    config["eot_token_id"] = 380
    (d / "config.json").write_text(json.dumps(config, indent=2))
    tok = _byte_tokenizer()
    assert tok.convert_tokens_to_ids(["<|mask|>", "<|endoftext|>", "<|eot|>"]) == [383, 381, 380]
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llada2_checkpoint(tmp_path_factory) -> Path:
    """A random block-diffusion (LLaDA2 layout) model over the same byte tokenizer, saved with it."""
    import torch

    from unmask.bench import random_model
    from unmask.models import ModelConfig, save_model

    d = tmp_path_factory.mktemp("tiny-llada2-checkpoint")
    cfg = ModelConfig(layout="llada2_moe", vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      mlp_hidden_size=128, max_seq_len=512, rope_theta=600000.0, norm_eps=1e-6, qk_norm=True,
                      partial_rotary_factor=0.5, router="sigmoid", n_experts=8, experts_per_token=2,
                      expert_hidden_size=32, n_groups=2, topk_groups=1, routed_scale=2.5, norm_topk_prob=True,
                      expert_bias=True, shared_expert_hidden_size=32, moe_layers=[False, True],
                      mask_token_id=383, eos_token_id=381, eot_token_id=380, pad_token_id=381)
    torch.manual_seed(0)
    save_model(random_model(cfg), d)
    _byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def clock_reads(monkeypatch):
    """clock_reads("unmask.sampling.rows") -> a list that gains an entry at each call of that module's
    `unmasked_fraction`, the guidance schedule's clock (to check that only schedules compute it)."""
    import importlib

    def count(module_name: str) -> list[int]:
        module = importlib.import_module(module_name)
        calls, real = [], module.unmasked_fraction
        monkeypatch.setattr(module, "unmasked_fraction", lambda *a: calls.append(1) or real(*a))
        return calls
    return count
