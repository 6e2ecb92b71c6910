"""`unmask serve` on a block-diffusion (LLaDA2.x) checkpoint (issue 11, part 5): a real uvicorn
server and the official `openai` client, against the library's own `generate_text`."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

import unmask
from serve_fixtures import live_server, metrics, wait_idle
from unmask.cli import main as cli_main
from unmask.sampling.text import generate_text
from unmask.serve import ServeConfig, create_app

MODEL = "tiny-llada2"
STORY = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def loaded(tiny_llada2_checkpoint):
    return unmask.load(tiny_llada2_checkpoint)


@pytest.fixture(scope="module")
def url(loaded):
    config = ServeConfig(model_name=MODEL, max_tokens_limit=448, default_max_tokens=24, batch_window_ms=50)
    with live_server(create_app(*loaded, config)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, messages, **kw):
    extra = {k: kw.pop(k) for k in ("steps", "block_length", "cfg_scale", "threshold", "top_k", "reuse_uncond",
                                    "remasking", "diffusion_progress") if k in kw}
    return client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra or None, **kw)


def test_page_and_models_know_the_family(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert '"block_diffusion": true' in httpx.get(url + "/").text


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_chat_and_completion_equal_the_library(client, loaded, cfg_scale):
    """Server defaults for a block model: block_length 32, 32 steps per block, threshold 0.95."""
    r = chat(client, STORY, max_tokens=24, cfg_scale=cfg_scale)
    [expected] = generate_text(*loaded, [STORY], gen_length=24, cfg_scale=cfg_scale)
    assert r.choices[0].message.content == expected
    assert r.usage.completion_tokens <= 24
    c = client.completions.create(model=MODEL, prompt="The river", max_tokens=20,
                                  extra_body={"block_length": 8, "steps": 4, "cfg_scale": cfg_scale})
    [expected] = generate_text(*loaded, ["The river"], gen_length=20, block_length=8, steps=4, cfg_scale=cfg_scale)
    assert c.choices[0].text == expected


def test_concurrent_requests_batch_and_each_equals_its_request_alone(client, url):
    prompts = [[{"role": "user", "content": "why " * i + "?"}] for i in range(6)]   # six prompt lengths
    solo = [chat(client, p, max_tokens=16, block_length=8).choices[0].message.content for p in prompts]
    before = metrics(url)
    answers: dict[int, str] = {}

    def ask(i):
        answers[i] = chat(client, prompts[i], max_tokens=16, block_length=8).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answers[i] for i in range(len(prompts))] == solo
    after = metrics(url)
    batched = lambda m: m.get("unmask_batch_size_count", 0) - m.get('unmask_batch_size_bucket{le="1.0"}', 0)
    assert batched(after) > batched(before), "concurrent requests never shared a batch"


@pytest.mark.parametrize("progress", [False, True])
def test_stream_sends_each_block_as_it_is_final(client, progress):
    """Earlier blocks are final under block-causal attention: text arrives block by block, before the
    last block is decoded, and adds up to the non-streamed text."""
    kw = dict(max_tokens=64, block_length=8)
    plain = chat(client, STORY, **kw).choices[0].message.content
    chunks = list(chat(client, STORY, stream=True, diffusion_progress=progress, **kw))
    texts = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in texts) == plain
    assert len(texts) > 1
    if progress:
        views = [c.diffusion for c in texts]
        assert len({v["block"] for v in views}) > 1          # text came with more than one block
        assert views[0]["tokens"][-8:] == [None] * 8         # the first text came before the last block began
        assert all(c.diffusion["steps"] is None for c in chunks if getattr(c, "diffusion", None))


def test_top_p_sampling_is_supported_and_seeded(client, loaded):
    """OpenAI's top_p (refused for LLaDA models) is the block sampler's nucleus sampling."""
    kw = dict(max_tokens=16, block_length=8, temperature=0.7, seed=0)
    first = chat(client, STORY, top_p=0.9, **kw).choices[0].message.content
    assert chat(client, STORY, top_p=0.9, **kw).choices[0].message.content == first
    [expected] = generate_text(*loaded, [STORY], gen_length=16, block_length=8, temperature=0.7, top_p=0.9,
                               generator=torch.Generator().manual_seed(0))
    assert first == expected
    assert chat(client, STORY, **kw).choices[0].message.content != first    # top_p was applied


@pytest.mark.parametrize("extra, param", [
    (dict(remasking="random"), "remasking"), (dict(cache="dual"), "cache"), (dict(threshold=1.5), "threshold"),
    (dict(top_k=0, temperature=0.7), "top_k"), (dict(top_p=0.0, temperature=0.7), "top_p"),
    (dict(messages=[{"role": "user", "content": "Mira <|mask|> lives"}], infill=True), "infill"),
])
def test_llada_only_and_invalid_fields_are_a_400_naming_them(url, extra, param):
    body = {"model": MODEL, "messages": STORY, "max_tokens": 8, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_disconnected_stream_frees_its_slot(url):
    before = metrics(url)["unmask_requests_cancelled_total"]
    body = {"model": MODEL, "messages": STORY, "stream": True, "diffusion_progress": True, "max_tokens": 448,
            "block_length": 8, "steps": 8, "threshold": 1.0, "cfg_scale": 1.0}   # 448 steps: a minute on a CPU
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data: ") and "diffusion" in line)
    left = time.monotonic()
    after = wait_idle(url)
    assert time.monotonic() - left < 5.0
    assert after["unmask_requests_cancelled_total"] == before + 1


def test_flags_follow_the_checkpoints_family(tiny_llada2_checkpoint, capsys):
    """--remasking is LLaDA-only: refused for a LLaDA2.x checkpoint before it loads; --steps is per block."""
    rc = cli_main(["serve", "--model", str(tiny_llada2_checkpoint), "--device", "cpu", "--remasking", "random"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("unmask serve: error: --remasking") and err.count("\n") == 1, err
    config = ServeConfig(steps=1000, default_max_tokens=64)
    with pytest.raises(ValueError, match="--steps"):
        config.check()                                    # LLaDA: at most one step per token
    assert config.options(64, block_diffusion=True).steps == 1000
