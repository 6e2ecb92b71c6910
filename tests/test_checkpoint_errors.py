"""Bad checkpoints are a CheckpointError naming the file; run directories and cached hub ids load."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch

import unmask
from unmask.models import CheckpointError, load_model, load_tokenizer, read_json, resolve_checkpoint_dir

DATA = Path(__file__).parent / "data"
DENSE, MOE = DATA / "llada-dense-tiny", DATA / "lladamoe-tiny"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reference_logits.pt"))
    return dst


def edit_config(d: Path, **changes) -> None:
    cfg = read_json(d / "config.json")
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "DELETE"}))


def refused(path, *words) -> str:
    """The CheckpointError message of loading `path`, after checking it contains each of `words`."""
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    for w in words:
        assert str(w) in str(e.value)
    return str(e.value)


# ---- config.json ----------------------------------------------------------------------------------

@pytest.mark.parametrize("src, changes, message", [
    (DENSE, {"n_layers": "four"}, 'n_layers must be an integer, got "four"'),
    (DENSE, {"d_model": None}, "d_model must be an integer, got null"),
    (DENSE, {"vocab_size": 1.5}, "vocab_size must be an integer, got 1.5"),
    (DENSE, {"n_heads": True}, "n_heads must be an integer, got true"),
    (DENSE, {"weight_tying": 1}, "weight_tying must be true or false, got 1"),
    (DENSE, {"rope_theta": [1]}, "rope_theta must be a number, got [1]"),
    (DENSE, {"n_layers": "DELETE"}, "n_layers is missing"),
    (DENSE, {"n_heads": 0, "n_kv_heads": 0}, "n_heads must be at least 1, got 0"),
    (MOE, {"num_experts_per_tok": "2"}, 'num_experts_per_tok must be an integer, got "2"'),
    (MOE, {"moe_layer_freq": ["yes", 1]}, "moe_layer_freq must be an integer or a list of 0/1"),
    (DENSE, {"rope_theta": float("nan")}, "rope_theta must be a finite number, got nan"),
    (DENSE, {"rope_theta": 0}, "rope_theta must be a finite number > 0"),
    (DENSE, {"rms_norm_eps": -1e-5}, "norm_eps must be a finite number > 0 (rms_norm_eps in config.json)"),
    (MOE, {"rope_theta": float("inf")}, "rope_theta must be a finite number, got inf"),
])
def test_config_values_of_the_wrong_type_name_file_and_key(tmp_path, src, changes, message):
    d = copy_checkpoint(src, tmp_path / "ckpt")
    edit_config(d, **changes)
    refused(d, d / "config.json", message)


@pytest.mark.parametrize("content, message", [
    (b"[]", "must hold a JSON object {...}, not []"),
    (b'"llada"', 'must hold a JSON object {...}, not "llada"'),
    (b"{", "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"\xff\xfe\x00\x81", "is not valid JSON"),
    (b"[" * 100_000, "is not valid JSON"),
])
def test_config_json_that_is_not_a_json_object(tmp_path, content, message):
    d = copy_checkpoint(DENSE, tmp_path / "ckpt")
    (d / "config.json").write_bytes(content)
    refused(d, d / "config.json", message)


def test_read_json_returns_objects_and_names_the_file_otherwise(tmp_path):
    assert read_json(DENSE / "config.json")["model_type"] == "llada"
    with pytest.raises(CheckpointError, match="is a directory|Is a directory"):
        read_json(tmp_path)
    with pytest.raises(CheckpointError, match="No such file"):
        read_json(tmp_path / "absent.json")


# ---- weights --------------------------------------------------------------------------------------

def _shard(d: Path) -> dict:
    """Split d/model.safetensors into two shards and an index; returns the weight map."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for file in set(weight_map.values()):
        save_file({n: tensors[n] for n, f in weight_map.items() if f == file}, d / file)
    return weight_map


@pytest.mark.parametrize("index, message", [
    ({}, 'needs a "weight_map" object'),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, 'needs a "weight_map" object'),
    ({"weight_map": {"model.transformer.wte.weight": 1}}, 'needs a "weight_map" object'),
    ({"weight_map": {"model.transformer.wte.weight": "model-00009-of-00009.safetensors"}},
     "lists shard(s) missing from"),
    ({"weight_map": {"not.in.any.shard": "model-00001-of-00002.safetensors"}},
     "places not.in.any.shard in model-00001-of-00002.safetensors, which does not hold it"),
])
def test_bad_safetensors_index(tmp_path, index, message):
    d = copy_checkpoint(DENSE, tmp_path / "ckpt")
    _shard(d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(d, d / "model.safetensors.index.json", message)


def test_shapes_are_checked_against_the_headers_before_any_memory_is_allocated(tmp_path, monkeypatch):
    """A config asking for a 10^9 x 4096 embedding (16 TB) is refused from the 80 kB file's header."""
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated before checking"))
    d = copy_checkpoint(DENSE, tmp_path / "ckpt")
    edit_config(d, vocab_size=10**9, embedding_size=10**9, d_model=4096, n_heads=32, n_kv_heads=32)
    refused(d, d / "model.safetensors", "model.transformer.wte.weight has shape (384, 64)",
            "implies (1000000000, 4096)")
    weight_map = _shard(d)  # the same check reads each shard's header
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(d, "model.transformer.wte.weight has shape (384, 64)", "implies (1000000000, 4096)")


# ---- files and directories ------------------------------------------------------------------------

@pytest.mark.parametrize("src, key", [(DENSE, "n_layers"), (MOE, "num_hidden_layers"), (MOE, "num_experts")])
def test_huge_counts_are_refused_from_the_header_at_once(tmp_path, src, key):
    """Before: n_layers 10**9 built per-layer tables first: the load hung at 8 GB."""
    import time

    d = copy_checkpoint(src, tmp_path / "ckpt")
    edit_config(d, **{key: 10**9})
    started = time.monotonic()
    refused(d, d / "config.json", f"{key} is 1000000000, but", d / "model.safetensors", "tensors")
    with pytest.raises(CheckpointError, match=f"{key} is 1000000000"):
        unmask.models.load_config(d)   # the public config reader, on its own
    assert time.monotonic() - started < 5


def _rewrite_weights(d: Path, change) -> str:
    """Rewrite d's model.safetensors with `change` applied to its first tensor; returns that tensor's name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = change(tensors[name])
    save_file(tensors, d / "model.safetensors")
    return name


@pytest.mark.parametrize("change, words", [
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), ["NaN or infinite"]),
    (lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), ["NaN or infinite"]),
    (lambda t: t.round().to(torch.int64), ["I64", "not floating point"]),
], ids=["nan", "inf", "int64"])
def test_unsound_weights_are_refused_naming_the_tensor(tmp_path, change, words):
    """Before: NaN weights and integer-typed tensors loaded silently."""
    d = copy_checkpoint(DENSE, tmp_path / "ckpt")
    name = _rewrite_weights(d, change)
    refused(d, d / "model.safetensors", name, *words)


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    message = refused(DENSE / "model.safetensors", "is a file; pass the checkpoint directory that contains it")
    assert str(DENSE) in message
    d = copy_checkpoint(DENSE, tmp_path / "ckpt")
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    refused(d, d / "config.json", "Is a directory")
    refused(tmp_path / "nowhere", "does not exist")


def test_unreadable_directories_and_files(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    d = copy_checkpoint(DENSE, tmp_path / "ckpt")
    for target in (d / "config.json", d / "model.safetensors", d):
        mode = target.stat().st_mode
        target.chmod(0)
        try:
            refused(d, target, "not readable (permission denied)")
        finally:
            target.chmod(stat.S_IMODE(mode))
    assert load_model(d) is not None


@pytest.mark.parametrize("holder", ["chat_template.jinja", "tokenizer_config.json"])
def test_broken_chat_template_is_reported_at_load_naming_its_file(tmp_path, tiny_checkpoint, holder):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    broken = "{% for message in messages %}{{ message['content'] }}"  # no endfor
    (d / "chat_template.jinja").unlink(missing_ok=True)
    if holder == "chat_template.jinja":
        (d / holder).write_text(broken)
    else:
        cfg = read_json(d / holder)
        (d / holder).write_text(json.dumps({**cfg, "chat_template": broken}))
    with pytest.raises(CheckpointError, match="the chat template is not valid Jinja") as e:
        load_tokenizer(d)
    assert str(d / holder) in str(e.value)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", "[]", "must hold a JSON object {...}, not []"),
    ("tokenizer.json", "{not json", "is not valid JSON"),
])
def test_damaged_tokenizer_files_are_named(tmp_path, tiny_checkpoint, name, content, message):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (d / name).write_text(content)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    assert f"{d / name} {message}" in str(e.value)


# ---- training run directories ---------------------------------------------------------------------

def test_a_run_directory_loads_the_checkpoint_latest_names(tmp_path, tiny_checkpoint):
    """A real (tiny) training run: unmask.load(run) is its newest step, with that step's tokenizer."""
    from unmask.train import TrainConfig
    from unmask.train.trainer import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Mira {i} lives in a small house by the river." for i in range(200)))
    run = tmp_path / "run"
    train(TrainConfig(data=[str(corpus)], tokenizer=str(tiny_checkpoint), out_dir=str(run), d_model=32,
                      n_layers=1, n_heads=2, seq_len=32, batch_size=4, lr=1e-2, warmup=1, max_steps=3,
                      save_every=1, keep_last=0, eval_every=0, progress=False))
    assert (run / "latest").read_text().strip() == "step-000003"
    assert resolve_checkpoint_dir(run) == run / "step-000003"
    model, tokenizer = unmask.load(run)
    newest, first = load_model(run / "step-000003").state_dict(), load_model(run / "step-000001").state_dict()
    assert all(torch.equal(t, newest[k]) for k, t in model.state_dict().items())
    assert not all(torch.equal(t, first[k]) for k, t in model.state_dict().items())
    assert tokenizer.mask_token_id == model.config.mask_token_id == 383


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    step = copy_checkpoint(DENSE, run / "step-000001")
    (step / "manifest.json").write_text(json.dumps({"step": 1, "files": {}}))
    (run / "latest").write_text("step-000001\n")
    return run


@pytest.mark.parametrize("latest, message", [
    (b"", "latest is empty; write the name of the run's newest step directory into it"),
    (b"\x00\x9f\x92\x96", "latest holds b'\\x00\\x9f\\x92\\x96', not a directory name"),
    (b"../elsewhere", "not a directory name"),
    (b"step-000002\n", "latest names step-000002, which is not a directory in"),
])
def test_a_bad_latest_pointer(tmp_path, latest, message):
    run = _fake_run(tmp_path)
    assert resolve_checkpoint_dir(run) == run / "step-000001"
    (run / "latest").write_bytes(latest)
    refused(run, run / "latest", message)


def test_latest_must_name_a_complete_checkpoint(tmp_path):
    run = _fake_run(tmp_path)
    manifest = run / "step-000001" / "manifest.json"
    manifest.write_text("[]")
    refused(run, manifest, "must hold a JSON object {...}, not []")
    manifest.unlink()
    refused(run, "step-000001 has no manifest.json, so it is not a complete checkpoint")


# ---- Hugging Face hub ids -------------------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face cache holding owner/tiny-llada at revision abc; any socket use fails."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--owner--tiny-llada"
    copy_checkpoint(DENSE, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("unmask tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_a_hub_id_loads_from_the_local_cache(hub_cache):
    assert resolve_checkpoint_dir("owner/tiny-llada") == hub_cache / "models--owner--tiny-llada" / "snapshots" / "abc"
    ids = torch.arange(12).view(1, -1)
    assert torch.equal(load_model("owner/tiny-llada")(ids).logits, load_model(DENSE)(ids).logits)


def test_a_hub_id_not_in_the_cache_names_the_directory_form(hub_cache):
    message = refused("GSAI-ML/LLaDA-8B-Instruct", "GSAI-ML/LLaDA-8B-Instruct is not a local directory and is not "
                      f"in the Hugging Face cache (HF_HUB_CACHE={hub_cache})",
                      "unmask.load('/path/to/LLaDA-8B-Instruct')")
    assert "never downloads" in message
