"""The HTTP server end to end: a real uvicorn server on loopback, the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

import unmask
from unmask.sampling.text import generate_text
from serve_fixtures import live_server, metrics, wait_idle
from unmask.serve import ServeConfig, create_app
from unmask.sampling import SamplerOptions
from unmask.serve.batching import BatchRunner, Finished, Job, QueueFull, Scheduler, ShuttingDown
from unmask.serve.textstream import RowText

MODEL = "tiny"
LONG = {"max_tokens": 448, "steps": 448, "block_length": 32, "cfg_scale": 1.0}   # seconds on the CPU


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return unmask.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def url(loaded):
    model, tokenizer = loaded
    config = ServeConfig(model_name=MODEL, max_tokens_limit=480, default_max_tokens=32, max_batch_size=16,
                         batch_window_ms=20)
    with live_server(create_app(model, tokenizer, config)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content: str, **kw):
    extra = {k: kw.pop(k) for k in ("steps", "block_length", "cfg_scale", "remasking", "diffusion_progress") if k in kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          extra_body=extra or None, **kw)


def test_ops_endpoints(url, client):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/version").json() == {"version": unmask.__version__}
    assert [m.id for m in client.models.list().data] == [MODEL]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "diffusion_progress" in page.text


def test_chat_completion(client, loaded):
    tokenizer = loaded[1]
    r = chat(client, "Where does Mira live?", max_tokens=24, cfg_scale=1.0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Where does Mira live?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 24


def test_completion_and_stop(client):
    full = client.completions.create(model=MODEL, prompt="The river", max_tokens=32)
    assert full.object == "text_completion" and full.usage.prompt_tokens == len("The river")
    text = full.choices[0].text
    stop = next((text[i:i + 2] for i in range(len(text) // 3, len(text) - 1) if "\ufffd" not in text[i:i + 2]), None)
    if stop is None:
        pytest.skip("the tiny model produced no usable stop string")
    cut = client.completions.create(model=MODEL, prompt="The river", max_tokens=32, stop=[stop, "never-seen"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= full.usage.completion_tokens


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8, seed=1234)])
def test_stream_equals_non_stream(client, kw):
    plain = chat(client, "Tell me a story", max_tokens=32, block_length=16, **kw)
    again = chat(client, "Tell me a story", max_tokens=32, block_length=16, **kw)
    assert again.choices[0].message.content == plain.choices[0].message.content   # the seed is honoured
    for progress in (False, True):
        chunks = list(chat(client, "Tell me a story", max_tokens=32, block_length=16, stream=True,
                           stream_options={"include_usage": True}, diffusion_progress=progress, **kw))
        assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [plain.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
        views = [c.diffusion for c in chunks if getattr(c, "diffusion", None)]
        if progress:
            assert len(views) >= 2 and len(views[-1]["tokens"]) == 32
            assert views[0]["tokens"].count(None) > views[-1]["tokens"].count(None)
        else:
            assert not views


def test_concurrent_requests_are_batched(client, url):
    prompts = [f"Question {i}: " + "why " * (i % 5) for i in range(16)]
    solo = [chat(client, p, max_tokens=16).choices[0].message.content for p in prompts]
    before = metrics(url)
    answers: dict[int, str] = {}

    def ask(i):
        answers[i] = chat(client, prompts[i], max_tokens=16).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answers[i] for i in range(16)] == solo
    after = metrics(url)
    batched = lambda m: m.get("unmask_batch_size_count", 0) - m.get('unmask_batch_size_bucket{le="1.0"}', 0)
    assert batched(after) > batched(before), "16 concurrent requests never shared a batch"


BAD_CHAT = [
    ("{not json", 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 500}], "max_tokens": 64}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "block_length": 7},
     400, "block_length"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32, "block_length": 16,
      "steps": 3}, 400, "steps"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "cfg_scale": -1.0}, 400, "cfg_scale"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "remasking": "bogus"}, 400, "remasking"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0.5}, 400, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_k": 5}, 400, "top_k"),   # LLaDA2.x only
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "best_of": 3}, 400, "best_of"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_input(url, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(url + "/health").status_code == 200


def test_bad_input_through_official_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", max_tokens=32, block_length=7)
    assert "multiple of block_length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="", max_tokens=8)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=8)
    assert chat(client, "still there?", max_tokens=8).choices[0].message.content is not None


def test_disconnected_stream_frees_its_slot(url):
    before = metrics(url)["unmask_requests_cancelled_total"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "stream": True,
            "diffusion_progress": True, **LONG}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data: ") and "diffusion" in l)
    left = time.monotonic()
    after = wait_idle(url)
    assert time.monotonic() - left < 5.0                 # the batch dropped it; a full run takes far longer
    assert after["unmask_requests_cancelled_total"] == before + 1


def test_disconnected_request_frees_its_slot(url):
    before = metrics(url)["unmask_requests_cancelled_total"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
    after = wait_idle(url)
    assert after["unmask_requests_cancelled_total"] == before + 1


def test_metrics_report_traffic(url):
    m = metrics(url)
    assert m['unmask_requests_total{endpoint="/v1/chat/completions",status="200"}'] > 0
    assert m['unmask_requests_total{endpoint="/v1/chat/completions",status="400"}'] > 0
    for name in ("unmask_generated_tokens_total", "unmask_tokens_per_second",
                 'unmask_request_latency_seconds_count{endpoint="/v1/chat/completions"}',
                 "unmask_batch_size_count", "unmask_time_to_first_token_seconds_count"):
        assert m[name] > 0, name


def test_queue_limit_and_timeout(loaded):
    """A full queue answers 429 with Retry-After; a request past its timeout gets 504."""
    model, tokenizer = loaded
    config = ServeConfig(model_name=MODEL, max_tokens_limit=480, max_batch_size=1, max_queue=1, timeout_s=1.0)
    with live_server(create_app(model, tokenizer, config)) as base:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **LONG}
        results = {}

        def post(name):
            results[name] = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)

        running = threading.Thread(target=post, args=("running",))
        running.start()
        while metrics(base)["unmask_requests_in_flight"] < 1:
            time.sleep(0.02)
        queued = threading.Thread(target=post, args=("queued",))
        queued.start()
        while metrics(base)["unmask_queue_depth"] < 1:
            time.sleep(0.02)
        full = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        running.join()
        queued.join()
        assert results["running"].status_code == 504, results["running"].text
        assert results["queued"].status_code == 504
        assert httpx.get(base + "/health").status_code == 200


def test_scheduler_refuses_work_when_closing(loaded):
    model, tokenizer = loaded

    async def scenario():
        runner = BatchRunner(model, tokenizer, mask_id=383, pad_id=381, eos_id=381, end_ids={381}, metrics=None)
        scheduler = Scheduler(runner, max_batch_size=4, max_queue=1, window_s=0.0)
        options = SamplerOptions(steps=8, gen_length=8, block_length=8)
        job = lambda: Job(prompt=[1, 2], options=options, loop=asyncio.get_running_loop(), deadline=time.monotonic() + 9)
        scheduler.submit(job())
        with pytest.raises(QueueFull):
            scheduler.submit(job())
        await scheduler.close()
        with pytest.raises(ShuttingDown):
            scheduler.submit(job())

    asyncio.run(scenario())


class InstantRunner:
    """A runner that records how many jobs start together and finishes them at once: as whole-call
    groups (as under --cuda-graph), or as stepped rows admitted at a step."""

    def __init__(self, stepped: bool):
        self.stepped, self.groups = stepped, []

    def steps(self, job) -> bool:
        return self.stepped

    def run(self, jobs) -> None:
        self.groups.append(len(jobs))
        for job in jobs:
            job.post(Finished("", None))

    def advance(self, running, admitted):
        self.run(admitted)
        return []


@pytest.mark.parametrize("stepped, spacing, groups", [(False, 0.4, [6]), (False, 2.0, [1, 1, 1]),
                                                      (True, 0.4, [3, 3])])
def test_an_idle_scheduler_gathers_a_whole_call_group_while_arrivals_keep_coming(stepped, spacing, groups):
    """Whole-call requests arriving a fraction of a window apart, over more than one window in
    all, start together (before, one window split them: answered clients send their next requests
    in clumps ~10 ms apart, and a GPU server under a steady load of 8 ran groups of 1 and 7);
    requests further apart than a window are not held back for each other; stepped rows wait one
    window only, since a late one joins at the next step."""
    window = 0.3   # long enough that a loaded machine's late wake-ups (tens of ms) do not split a group

    async def scenario():
        runner = InstantRunner(stepped)
        scheduler = Scheduler(runner, max_batch_size=8, max_queue=8, window_s=window)
        scheduler.start()
        loop = asyncio.get_running_loop()
        options = SamplerOptions(steps=8, gen_length=8, block_length=8)
        jobs = [Job(prompt=[1, 2], options=options, loop=loop, deadline=time.monotonic() + 60)
                for _ in range(sum(groups))]
        for job in jobs:
            scheduler.submit(job)
            await asyncio.sleep(spacing * window)
        for job in jobs:
            assert isinstance(await asyncio.wait_for(job.events.get(), 10), Finished)
        await scheduler.close()
        return runner.groups

    assert asyncio.run(scenario()) == groups


def test_row_text_holds_back_partial_characters_and_stop_prefixes(loaded):
    tokenizer = loaded[1]
    ids = tokenizer("ab€cd", add_special_tokens=False).input_ids          # '€' is three byte tokens
    mask = 383
    row = RowText(tokenizer, mask, {381, 380}, stop=["cd!"])
    gen = [mask] * 10
    sent = []
    for i, t in enumerate(ids):
        gen[i] = t
        sent.append(row.update(gen))
    assert sent[:5] == ["a", "b", "", "", "€"]              # nothing until the character is complete
    assert sent[5:] == ["", ""]                             # "cd" could be the start of the stop "cd!"
    gen[len(ids)] = 381                                     # EOS: the text ends; the held-back part is final
    assert row.update(gen) == "cd" and row.ending.finish_reason == "stop"
    assert row.ending.completion_tokens == len(ids) + 1


@pytest.mark.parametrize("extra", [dict(threshold=0.9), dict(cache="prefix"), dict(cache="dual", threshold=0.5),
                                   dict(cache="dual", cfg_scale=1.0, reuse_uncond=True)])
def test_fast_sampler_options_pass_through(url, loaded, extra):
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 32, "block_length": 16, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 32
    [expected] = generate_text(*loaded, [messages], chat=True, steps=32, gen_length=32, block_length=16, **extra)
    assert r.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("extra, field", [(dict(cache="bogus"), "cache"), (dict(reuse_uncond=True), "reuse_uncond")])
def test_invalid_fast_option_is_a_400(url, extra, field):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and field in error["message"] and error["param"] == field
