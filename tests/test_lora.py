"""LoRA through peft: SFT on every layout, exact resume, merging, and adapters in every entry point."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from conftest import _byte_tokenizer  # noqa: E402
from unmask.models import CheckpointError, load_model, save_model  # noqa: E402
from unmask.models.adapters import (adapter_base, adapter_tensors, attach_adapter, default_targets,  # noqa: E402
                                    lora_config, merge_adapter, model_tensors)
from unmask.train import TrainConfig  # noqa: E402
from unmask.train.trainer import Trainer, train  # noqa: E402
from resume_check import whole_and_resumed  # noqa: E402

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
LAYOUTS = ["llada-dense-tiny", "lladamoe-tiny", "llada2-moe-tiny"]
ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "fox": "yip"}


@pytest.fixture(scope="module", params=LAYOUTS)
def base(request, tmp_path_factory) -> Path:
    """A fixture checkpoint of one layout, its special ids set to the byte tokenizer's, saved with it."""
    d = tmp_path_factory.mktemp(request.param)
    model = load_model(DATA / request.param)
    model.config = model.config.with_(mask_token_id=383, eos_token_id=381, eot_token_id=380, pad_token_id=381)
    save_model(model, d)
    _byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    rows = [{"prompt": f"{i} the {a} says", "response": f"{s}."}
            for i, (a, s) in enumerate(rng.choice(list(ANIMALS.items())) for _ in range(200))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def all_targets(base: Path) -> list[str]:
    """Every target there is on `base`'s layout but the router and lm_head: MoE runs adapt their experts too."""
    return ["qkv", "out", "gate_up", "down"] + (["w_gate", "w_up", "w_down"] if "moe" in base.name else [])


def lora_run(out: Path, base: Path, data: Path, **overrides) -> TrainConfig:
    settings = dict(data=[str(data)], tokenizer=str(base), init_from=str(base), out_dir=str(out), sft=True,
                    lora_targets=all_targets(base),
                    lora=True, lora_rank=4, lora_alpha=8.0, seq_len=64, batch_size=8, lr=1e-2, min_lr=1e-3,
                    warmup=2, max_steps=8, eval_every=4, eval_batches=1, eval_mc_samples=2, save_every=100,
                    heldout_frac=0.1, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_ids() if ids is None else ids).logits


# ---- training ----------------------------------------------------------------------------------

def test_lora_sft_trains_only_the_adapter_and_the_loss_falls(tmp_path, base, sft_data):
    trainer = Trainer(lora_run(tmp_path / "run", base, sft_data, max_steps=60, batch_size=16, lora_rank=16,
                               lora_alpha=32.0, eval_every=0))
    frozen = {k: v.clone() for k, v in trainer.core.state_dict().items() if ".lora_" not in k}
    assert trainer.block_length == (32 if "llada2" in base.name else None)  # LLaDA2's block-causal objective
    trainable = {n for n, p in trainer.core.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    result = trainer.run()
    losses = list(result.losses.values())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5  # the MDM loss is noisy: compare means
    after = trainer.core.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the base never moved
    files = {p.name for p in result.checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= files
    assert "model.safetensors" not in files  # a checkpoint is the adapter, not another copy of the base
    assert adapter_base(result.checkpoint) == str(base.resolve())


def test_lora_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, base, sft_data):
    def cfg(run: str, **kw) -> TrainConfig:
        return lora_run(tmp_path / run, base, sft_data, grad_accum=2, **kw)

    whole, _, rest = whole_and_resumed(cfg)
    assert rest.evals[8] == whole.evals[8]
    a = (tmp_path / "a" / "step-000008" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "step-000008" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_lora_resumes_exactly_after_kill_9(tmp_path, sft_data):
    """A run killed with SIGKILL at whatever moment (mid-step, mid-checkpoint) resumes from its last
    complete checkpoint to the same adapter, byte for byte, as a run never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base = _dense_base(tmp_path)
    whole = train(lora_run(tmp_path / "whole", base, sft_data, max_steps=12, eval_every=0, save_every=2))
    killed = lora_run(tmp_path / "killed", base, sft_data, max_steps=12, eval_every=0, save_every=2)
    flags = [f"--{k.replace('_', '-')}" for k in ("sft", "lora")] + [
        "--data", str(sft_data), "--tokenizer", str(base), "--init-from", str(base), "--out", killed.out_dir,
        "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", *killed.lora_targets, "--seq-len", "64",
        "--batch-size", "8", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--max-steps", "12",
        "--eval-every", "0", "--save-every", "2", "--heldout-frac", "0.1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "unmask.cli", "train", *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = Path(killed.out_dir) / "latest"
    while not latest.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rest = train(lora_run(tmp_path / "killed", base, sft_data, max_steps=12, eval_every=0, save_every=2,
                          resume="auto"))
    assert rest.losses and rest.step == 12  # the kill cut the run short: the resumed run trained
    assert rest.losses == {s: whole.losses[s] for s in rest.losses}
    final = "step-000012/adapter_model.safetensors"
    assert (tmp_path / "killed" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_lora_in_two_processes_agrees_and_resumes_exactly(tmp_path, sft_data, fsdp):
    from test_train import _spawn

    base = _dense_base(tmp_path)

    def cfg(run: str, **kw) -> TrainConfig:
        return lora_run(tmp_path / run, base, sft_data, batch_size=4, eval_every=0, fsdp=fsdp, **kw)

    whole = _spawn(cfg("a"), tmp_path)   # asserts that the ranks hold the same weights and losses
    _spawn(cfg("b", stop_at=4), tmp_path)
    rest = _spawn(cfg("b", resume="auto"), tmp_path)
    assert rest["losses"] == {s: whole["losses"][s] for s in range(5, 9)}
    assert all(torch.equal(rest["weights"][k], whole["weights"][k]) for k in whole["weights"])
    final = "step-000008/adapter_model.safetensors"
    assert (tmp_path / "a" / final).read_bytes() == (tmp_path / "b" / final).read_bytes()


def test_lora_with_activation_checkpointing_and_cond_drop_matches_without(tmp_path, sft_data):
    base = _dense_base(tmp_path)
    plain = train(lora_run(tmp_path / "a", base, sft_data, cond_drop=0.2, max_steps=3, eval_every=0))
    recomputed = train(lora_run(tmp_path / "b", base, sft_data, cond_drop=0.2, max_steps=3, eval_every=0,
                                activation_checkpointing=True))
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_qlora_trains_on_an_int8_base_resumes_exactly_and_loads_on_the_float_base(tmp_path, sft_data):
    pytest.importorskip("torchao")
    base = _dense_base(tmp_path)

    def cfg(run: str, **kw) -> TrainConfig:
        return lora_run(tmp_path / run, base, sft_data, lora_quantize="int8", grad_accum=2, **kw)

    trainer = Trainer(cfg("probe"))
    assert type(trainer.core.blocks[0].attn.qkv).__name__ == "TorchaoLoraLinear"  # LoRA over torchao's int8 linear
    whole_and_resumed(cfg)
    assert not torch.allclose(_logits(load_model(base, adapter=tmp_path / "a")), _logits(load_model(base)), atol=1e-4)
    with pytest.raises(ValueError, match="add --lora"):
        TrainConfig(data=[str(sft_data)], tokenizer=str(base), init_from=str(base), sft=True, lora_quantize="int8")


def test_lora_settings_are_checked(tmp_path, sft_data):
    base = _dense_base(tmp_path)
    with pytest.raises(ValueError, match="--init-from"):
        TrainConfig(data=[str(sft_data)], tokenizer=str(base), sft=True, lora=True)
    cfg = load_model(base).config
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_config(cfg, 4, 8.0, ["q_proj"])
    with pytest.raises(ValueError, match="only in MoE"):
        lora_config(cfg, 4, 8.0, ["qkv", "w_gate"])
    with pytest.raises(ValueError, match="rank"):
        lora_config(cfg, 0, 8.0)
    full = train(TrainConfig(data=[str(sft_data)], tokenizer=str(base), init_from=str(base), sft=True, seq_len=48,
                             out_dir=str(tmp_path / "full"), max_steps=1, eval_every=0, progress=False))
    with pytest.raises(CheckpointError, match="without --lora"):
        Trainer(lora_run(tmp_path / "full", base, sft_data, resume=str(full.checkpoint)))


def test_default_targets_are_every_linear_of_attention_and_mlps_not_the_routed_experts():
    for name in LAYOUTS:
        assert default_targets(load_model(DATA / name).config) == ["qkv", "out", "gate_up", "down"]
    moe = load_model(DATA / "lladamoe-tiny")
    config = lora_config(moe.config, 4, 8.0, ["qkv", "w_gate", "w_up", "w_down"])
    assert (config.target_modules, config.target_parameters) == ({"qkv"}, ["w_gate", "w_up", "w_down"])


def test_adapter_file_names_round_trip():
    state = {"blocks.0.attn.qkv.lora_A.default.weight": torch.ones(1),
             "blocks.1.mlp.base_layer.lora_B.default.weight": torch.zeros(1), "embed.weight": torch.ones(1)}
    named = adapter_tensors(state)
    assert set(named) == {"base_model.model.blocks.0.attn.qkv.lora_A.weight",
                          "base_model.model.blocks.1.mlp.base_layer.lora_B.weight"}
    assert model_tensors(named).keys() == state.keys() - {"embed.weight"}


# ---- merging -----------------------------------------------------------------------------------

def _dense_base(tmp_path: Path) -> Path:
    d = tmp_path / "dense-base"
    if not d.exists():
        model = load_model(DATA / "llada-dense-tiny")
        save_model(model, d)
        _byte_tokenizer().save_pretrained(d)
    return d


def _random_adapter(base: Path, out: Path, targets: list[str] | None = None, seed: int = 1) -> Path:
    """An adapter of random A and B (peft's init leaves B at zero, which would change nothing)."""
    from unmask.models.adapters import add_lora, save_adapter

    model = load_model(base)
    config = lora_config(model.config, 4, 8.0, targets or all_targets(base), base=str(base))
    add_lora(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    save_adapter(config, adapter_tensors(model.state_dict()), out)
    return out


def test_merged_logits_equal_the_adapter_models(tmp_path, base):
    adapter = _random_adapter(base, tmp_path / "adapter")
    unmerged = _logits(attach_adapter(load_model(base), adapter))
    merged = merge_adapter(load_model(base), adapter)
    assert type(merged).__name__ == "MaskedDiffusionLM" and not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(_logits(merged), unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(load_model(base)), unmerged, atol=1e-3)  # the adapter does something


def test_merge_command_writes_a_plain_checkpoint(tmp_path, base):
    from unmask.cli import main

    adapter = _random_adapter(base, tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and "adapter_config.json" not in files
    unmerged = _logits(attach_adapter(load_model(base), adapter))
    assert torch.allclose(_logits(load_model(tmp_path / "merged")), unmerged, atol=1e-5, rtol=0)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 2  # never overwrites


def test_adapter_errors_say_what_to_change(tmp_path, base, sft_data):
    adapter = _random_adapter(base, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="is a LoRA adapter, not a model"):
        load_model(adapter)
    with pytest.raises(CheckpointError, match="not a LoRA adapter .it is a full checkpoint"):
        load_model(base, adapter=base)
    other = _random_adapter(_dense_base(tmp_path) if "dense" not in base.name else DATA / "lladamoe-tiny",
                            tmp_path / "other")
    with pytest.raises(CheckpointError, match="adapts other matrices|does not fit this base model"):
        load_model(base, adapter=other)


# ---- adapters in every entry point ---------------------------------------------------------------

@pytest.fixture(scope="module")
def adapted(tmp_path_factory, tiny_checkpoint):
    """(base, adapter, merged): the tiny dense checkpoint, a random adapter for it, and `unmask merge`'s output."""
    from unmask.cli import main

    d = tmp_path_factory.mktemp("adapted")
    adapter = _random_adapter(tiny_checkpoint, d / "adapter")
    assert main(["merge", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--out", str(d / "merged")]) == 0
    return tiny_checkpoint, adapter, d / "merged"


def _three(run) -> tuple:
    """run(model_args) for the base, the base with the adapter, and the merged checkpoint."""
    base, adapter, merged = run.adapted
    return (run(["--model", str(base)]), run(["--model", str(base), "--adapter", str(adapter)]),
            run(["--model", str(merged)]))


def test_generate_and_chat_apply_the_adapter(adapted, capsys, monkeypatch):
    from unmask.cli import main

    def generate(model_args):
        assert main(["generate", "hello", *model_args, "--gen-length", "12", "--steps", "12"]) == 0
        return capsys.readouterr().out

    generate.adapted = adapted
    base, with_adapter, merged = _three(generate)
    assert with_adapter == merged != base

    def chat(model_args):
        lines = iter(["hi", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
        assert main(["chat", *model_args, "--gen-length", "12", "--steps", "12"]) == 0
        return capsys.readouterr().out

    chat.adapted = adapted
    base, with_adapter, merged = _three(chat)
    assert with_adapter == merged != base


def test_the_adapter_alone_loads_the_base_it_records(adapted, capsys):
    from unmask.cli import main

    base, adapter, merged = adapted
    for model_args in (["--adapter", str(adapter)], ["--model", str(merged)]):
        assert main(["generate", "hello", *model_args, "--gen-length", "12", "--steps", "12"]) == 0
    alone, reference = capsys.readouterr().out.splitlines()
    assert alone == reference


def test_eval_applies_the_adapter(adapted, tmp_path):
    from unmask.cli import main

    def evaluate(model_args):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        assert main(["eval", *model_args, "--tasks", "know_arc", "--limit", "12", "--cfg-scale", "0",
                     "--out", str(out)]) == 0
        return json.loads((out / "results.json").read_text())["results"]

    evaluate.adapted = adapted
    base, with_adapter, merged = _three(evaluate)
    assert with_adapter == merged != base


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_serve_applies_the_adapter(adapted, monkeypatch):
    from fastapi.testclient import TestClient

    from unmask.cli import main

    answers = []

    def serve_once(app, sock, grace):  # instead of serving forever: one request through the real app
        sock.close()
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"model": app.state.server.config.model_name, "prompt": "hello",
                                                     "max_tokens": 12, "temperature": 0})
            answers.append((r.json()["model"], r.json()["choices"][0]["text"]))
        return True

    monkeypatch.setattr("unmask.serve.lifecycle.run", serve_once)

    def serve(model_args):
        assert main(["serve", *model_args, "--device", "cpu", "--port", _free_port()]) == 0
        return answers[-1]

    serve.adapted = adapted
    base, with_adapter, merged = _three(serve)
    assert with_adapter[1] == merged[1] != base[1]
    assert with_adapter[0] == "adapter"  # the served name is the adapter's


def test_bench_and_the_lm_eval_adapter_apply_the_adapter(adapted, tmp_path):
    from unmask.commands.bench import load_bench_model
    from unmask.harness import UnmaskLM

    base, adapter, merged = adapted
    reference = _logits(load_model(merged))
    model, name = load_bench_model(str(base), None, "cpu", torch.float32, str(adapter))
    assert torch.equal(_logits(model), reference) and "adapter" in name
    lm = UnmaskLM(model=str(base), adapter=str(adapter), mc_num=2)
    assert torch.equal(_logits(lm.model), reference)
    assert not torch.allclose(_logits(UnmaskLM(model=str(base), mc_num=2).model), reference, atol=1e-3)
    with pytest.raises(ValueError, match="--model DIR"):
        load_bench_model(None, "tiny", "cpu", torch.float32, str(adapter))
    from unmask.cli import main

    assert main(["bench", "--adapter", str(adapter), "--modes", "exact", "--batch-sizes", "1", "--prompt-len", "6",
                 "--gen-length", "8", "--block-length", "8", "--repeats", "1", "--device", "cpu", "--no-agreement",
                 "--json", str(tmp_path / "bench.json")]) == 0   # the base comes from the adapter's record
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["model"] == f"{base} + adapter {adapter}"


# ---- several adapters in one server ----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_adapters(adapted, tmp_path_factory):
    """(base, {name: adapter}): the tiny dense checkpoint and two random adapters of other targets."""
    base, first, _ = adapted
    second = tmp_path_factory.mktemp("second") / "qkv-only"
    _random_adapter(base, second, targets=["qkv", "out"], seed=2)
    return base, {"first": first, "second": second}


def test_an_adapter_set_computes_each_merged_model(two_adapters):
    from unmask.models.adapters import AdapterSet

    base, adapters = two_adapters
    merged = {name: _logits(merge_adapter(load_model(base), d)) for name, d in adapters.items()}
    merged[None] = _logits(load_model(base))
    model = load_model(base)
    held = AdapterSet(model, adapters)
    assert held.names == ("first", "second") and held.active is None
    lora_bytes = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    base_bytes = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    assert base_bytes == sum(p.numel() for p in load_model(base).parameters())   # one base, no copy
    assert lora_bytes < base_bytes
    for name in ["first", "second", None, "first", None, "second", "second"]:
        held.activate(name)
        assert torch.allclose(_logits(model), merged[name], atol=1e-5, rtol=0), name
    assert not torch.allclose(merged["first"], merged["second"], atol=1e-3)
    with pytest.raises(KeyError, match="first, second"):
        held.activate("third")


def test_an_adapter_set_on_routed_experts(tmp_path):
    """peft holds several adapters on stacked expert weights when they adapt the same ones (then
    each computes its merged model); otherwise the set is refused, naming what differs."""
    from unmask.models.adapters import AdapterSet

    base = DATA / "lladamoe-tiny"
    one, two = (_random_adapter(base, tmp_path / name, seed=seed) for name, seed in (("one", 1), ("two", 2)))
    model = load_model(base)
    held = AdapterSet(model, {"one": one, "two": two})
    for name, d in (("two", two), ("one", one)):
        held.activate(name)
        assert torch.allclose(_logits(model), _logits(merge_adapter(load_model(base), d)), atol=1e-5, rtol=0)
    attention_only = _random_adapter(base, tmp_path / "attention", targets=["qkv", "out"])
    with pytest.raises(ValueError, match="the same routed-expert weights .* differ .one: w_down, w_gate, w_up; "
                                         "attention: none"):
        AdapterSet(load_model(base), {"one": one, "attention": attention_only})


def test_one_server_serves_the_base_and_several_adapters(two_adapters, capsys, monkeypatch):
    """`unmask serve --adapter NAME=DIR --adapter DIR`: the official client's interleaved concurrent
    requests get, per model name, the text `unmask generate` gives with that adapter (or none)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from serve_fixtures import live_server, metrics

    from unmask.cli import main

    base, adapters = two_adapters
    prompts = ["hello", "the cat says", "once upon"]

    def generate(prompt, adapter_args):
        args = ["generate", prompt, "--model", str(base), *adapter_args, "--gen-length", "12", "--steps", "12"]
        assert main(args) == 0
        return capsys.readouterr().out.removesuffix("\n")

    served_names = {base.name: [], "first": ["--adapter", str(adapters["first"])],
                    "qkv-only": ["--adapter", str(adapters["second"])]}
    expected = {(m, p): generate(p, a) for m, a in served_names.items() for p in prompts}
    assert len({expected[m, "hello"] for m in served_names}) == 3   # three different models
    seen = {}

    def serve_and_ask(app, sock, grace):   # instead of serving until a signal: a real server, the official client
        sock.close()
        with live_server(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            seen["models"] = [(m.id, m.model_extra.get("parent")) for m in client.models.list().data]
            asks = [(m, p) for p in prompts for m in served_names] * 2   # interleaved: base, first, qkv-only, base, ...

            def ask(model_prompt):
                model, prompt = model_prompt
                r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                              extra_body={"steps": 12})
                return r.model, prompt + r.choices[0].text

            with ThreadPoolExecutor(len(asks)) as pool:
                seen["answers"] = dict(zip(asks, pool.map(ask, asks)))
            seen["metrics"] = metrics(url)
            with pytest.raises(openai.NotFoundError) as e:
                client.completions.create(model="third", prompt="hello", max_tokens=4)
            seen["unknown"] = e.value.body
        return True

    monkeypatch.setattr("unmask.serve.lifecycle.run", serve_and_ask)
    assert main(["serve", "--model", str(base), "--adapter", f"first={adapters['first']}",
                 "--adapter", str(adapters["second"]), "--device", "cpu", "--port", _free_port(),
                 "--max-batch-size", "4", "--batch-window-ms", "50"]) == 0
    assert seen["models"] == [(base.name, None), ("first", base.name), ("qkv-only", base.name)]
    batches, alone = seen["metrics"]["unmask_batch_size_count"], seen["metrics"]['unmask_batch_size_bucket{le="1.0"}']
    assert batches >= 6 and batches > alone   # rows of one model share batches, of 3 models never (4 rows at most)
    for (model, prompt), answer in seen["answers"].items():
        assert answer == (model, expected[model, prompt]), (model, prompt)
    assert seen["unknown"]["code"] == "model_not_found" and seen["unknown"]["param"] == "model"
    assert all(repr(name) in seen["unknown"]["message"] for name in served_names)


def test_several_adapters_errors_say_what_to_change(two_adapters, capsys, tmp_path):
    from unmask.cli import main
    from unmask.commands.serve import served_adapters

    base, adapters = two_adapters
    first, second = map(str, adapters.values())
    assert served_adapters([first, f"b={second}"]) == {"adapter": first, "b": second}
    assert served_adapters(None) == {}
    for args, message in [
        (["--adapter", f"x={first}", "--adapter", f"x={second}"], "two adapters are named 'x'"),
        (["--adapter", "x="], "give the adapter's directory after '='"),
        (["--adapter", f"{base.name}={first}", "--adapter", second], "has the base model's served name"),
        (["--adapter", first, "--adapter", second, "--tp", "2"], "do not combine with --tp"),
        (["--adapter", first, "--adapter", second, "--cuda-graph"], "do not combine with --cuda-graph"),
    ]:
        assert main(["serve", "--model", str(base), *args, "--device", "cpu", "--port", _free_port()]) == 2
        assert message in capsys.readouterr().err, message
    other = _random_adapter(_dense_base(tmp_path), tmp_path / "other-base")
    assert main(["serve", "--adapter", first, "--adapter", str(other), "--device", "cpu", "--port", _free_port()]) == 2
    assert "record different base models" in capsys.readouterr().err
