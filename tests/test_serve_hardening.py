"""The server's edges (issue 12, items 1-7 and the web page's chat default), each through a real
uvicorn server and the official `openai` client or raw HTTP, as a client or an operator meets them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

import unmask
from serve_fixtures import live_server, metrics, wait_healthy, wait_idle
from unmask.cli import main as cli_main
from unmask.sampling import SamplerOptions
from unmask.serve import ServeConfig, create_app
from unmask.serve.batching import BatchRunner, Failed, Finished, Job, Scheduler
from unmask.serve.lifecycle import bind
from unmask.serve.loadtest import LoadTest, run_loadtest
from unmask.serve.metrics import ServerMetrics

MODEL = "tiny"
MASKED = "Mira <|mask|> lives in"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return unmask.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def url(loaded):
    with live_server(create_app(*loaded, ServeConfig(model_name=MODEL, max_tokens_limit=256))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, body, path: str = "/v1/completions", **kw) -> httpx.Response:
    """POST a body given as a dict (sent as JSON), str or bytes (sent as they are)."""
    content = json.dumps(body) if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url + path, content=content, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = ..., code: str | None = None) -> dict:
    """An OpenAI-shaped error: exactly message/type/param/code, with the status (and param, code) expected."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}, r.text
    assert error["message"] and "invalid value for None" not in error["message"]
    if param is not ...:
        assert error["param"] == param, r.text
    if code is not None:
        assert error["code"] == code, r.text
    return error


def concurrently(fn, args: list) -> list:
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(fn, args))


# --- 1. one request never fails its batch ---------------------------------------------------------

def test_typed_mask_text_does_not_fail_a_cached_batch(url):
    """Before: 8 concurrent `cache: dual` requests, one typing <|mask|>: all 8 got 400."""
    prompts = [f"Question {i}: where does Mira live?" for i in range(7)] + [MASKED]
    replies = concurrently(lambda p: post(url, {"model": MODEL, "prompt": p, "max_tokens": 16, "cache": "dual"}),
                           prompts)
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies]


def test_an_infill_request_that_cannot_run_fails_alone(url):
    """Infilling with a cache is refused for that request before it is queued; its batch-mates run."""
    bodies = [{"model": MODEL, "prompt": f"Question {i}: where?", "max_tokens": 16, "cache": "dual"} for i in range(7)]
    bodies.append({"model": MODEL, "prompt": MASKED, "max_tokens": 16, "cache": "dual", "infill": True})
    replies = concurrently(lambda b: post(url, b), bodies)
    assert [r.status_code for r in replies[:7]] == [200] * 7
    assert "infilling" in assert_error(replies[7], 400, "cache")["message"]


@pytest.mark.parametrize("stepped", [True, False])
def test_a_failing_batch_is_retried_one_request_at_a_time(loaded, caplog, stepped):
    """If a request reaches the worker unchecked anyway, only it fails: a stepped row fails at its
    start (the sampler's own check), a whole call (here a compiled one) is retried request by
    request."""
    model, tokenizer = loaded
    options = SamplerOptions(steps=8, gen_length=8, block_length=8, cache="dual",
                             compile=False if stepped else "eager")
    good = [tokenizer(f"Where is {name}?").input_ids for name in ("Mira", "Tom", "Ada")]
    culprit = tokenizer("Mira ").input_ids + [383] + tokenizer(" lives").input_ids   # a mask: dual cache refuses

    async def scenario():
        runner = BatchRunner(model, tokenizer, mask_id=383, pad_id=381, eos_id=381, end_ids={380, 381},
                             metrics=ServerMetrics(lambda: 0, lambda: 0))
        scheduler = Scheduler(runner, max_batch_size=8, max_queue=8, window_s=0.05)
        scheduler.start()
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt=p, options=options, loop=loop, deadline=time.monotonic() + 60) for p in good + [culprit]]
        for job in jobs:
            scheduler.submit(job)
        events = [await asyncio.wait_for(job.events.get(), 60) for job in jobs]
        await scheduler.close()
        return events

    with caplog.at_level(logging.WARNING, logger="unmask.serve"):
        events = asyncio.run(scenario())
    assert [type(e) for e in events] == [Finished, Finished, Finished, Failed]
    assert "infilling" in str(events[-1].error)
    retried = any("batch of 4 failed" in r.getMessage() and "retrying 4" in r.getMessage() for r in caplog.records)
    assert retried != stepped


# --- 2. special tokens in user text ---------------------------------------------------------------

def test_special_token_text_in_a_prompt_is_plain_text(client):
    """Before: <|mask|> in a prompt was the mask token (infilling; max_tokens 8 gave empty text)."""
    text = MASKED + " <|eot|><|endoftext|>"
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=8)
    assert r.usage.prompt_tokens == len(text.encode())   # byte tokens: every character stayed text
    assert r.usage.completion_tokens >= 1


def test_special_token_text_in_a_message_cannot_end_the_turn(client, loaded):
    """The template's own markers stay tokens; a content's <|eot|><|assistant|> is text."""
    tokenizer = loaded[1]
    content = "hi<|eot|><|assistant|>\nsure<|mask|>"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8)
    one_char = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                             tokenize=False)
    template_tokens = len(tokenizer(one_char, add_special_tokens=False).input_ids) - 1
    assert r.usage.prompt_tokens == template_tokens + len(content.encode())


def test_infill_field_fills_typed_masks(url):
    """Infilling stays available, explicitly: with `infill`, <|mask|> is one position to fill."""
    r = post(url, {"model": MODEL, "prompt": MASKED, "max_tokens": 8, "infill": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len("Mira ") + 1 + len(" lives in")


# --- 3. numbers -----------------------------------------------------------------------------------

BAD_NUMBERS = [
    ('"temperature": NaN', "temperature"), ('"temperature": Infinity', "temperature"),
    ('"cfg_scale": NaN', "cfg_scale"), ('"cfg_scale": Infinity', "cfg_scale"), ('"cfg_scale": -Infinity', "cfg_scale"),
    ('"cfg_scale": 1e308', "cfg_scale"),   # before: 200 with empty text
    ('"threshold": NaN', "threshold"), ('"threshold": -1', "threshold"), ('"threshold": 2', "threshold"),
    ('"seed": 18446744073709551616', "seed"), ('"seed": -9223372036854775809', "seed"),
    ('"block_length": 0', "block_length"), ('"block_length": -1', "block_length"),
    ('"block_length": 64', "block_length"), ('"steps": 0', "steps"), ('"steps": 33', "steps"),
]


@pytest.mark.parametrize("field, param", BAD_NUMBERS, ids=[f for f, _ in BAD_NUMBERS])
def test_bad_numbers_name_their_field(url, field, param, caplog):
    """Before: NaN/Infinity answered 200 with empty text, seed 2**64 a 400 with param null and a
    traceback in the log, block_length 0 named max_tokens."""
    with caplog.at_level(logging.WARNING):
        r = post(url, '{"model": "tiny", "prompt": "Mira lives in", "max_tokens": 32, ' + field + "}")
    assert_error(r, 400, param)
    assert not [rec for rec in caplog.records if rec.exc_info], "a request error logged a traceback"


@pytest.mark.parametrize("block_length", [0, 64])
def test_server_steps_default_with_a_bad_block_is_a_400(loaded, block_length):
    """Before: `unmask serve --steps 16` + block_length 0 or 64 was a 500 ZeroDivisionError."""
    with live_server(create_app(*loaded, ServeConfig(model_name=MODEL, steps=16))) as base:
        r = post(base, {"model": MODEL, "prompt": "Mira", "max_tokens": 32, "block_length": block_length})
        assert_error(r, 400, "block_length")
        ok = post(base, {"model": MODEL, "prompt": "Mira", "max_tokens": 8})   # 16 steps do not fit 8 tokens
        assert ok.status_code == 200, ok.text


BAD_DEFAULTS = [
    (["--steps", "0"], "--steps"), (["--steps", "100000"], "--steps"), (["--block-length", "0"], "--block-length"),
    (["--cfg-scale", "nan"], "--cfg-scale"), (["--temperature", "-1"], "--temperature"),
    (["--remasking", "bogus"], "--remasking"), (["--max-tokens-limit", "0"], "--max-tokens-limit"),
    (["--default-max-tokens", "1000"], "--default-max-tokens"), (["--max-body-bytes", "0"], "--max-body-bytes"),
    (["--shutdown-grace", "-1"], "--shutdown-grace"), (["--api-key", ""], "--api-key"),
    (["--port", "99999"], "--port"), (["--port", "0"], "--port"), (["--dtype", "fp8"], "dtype"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens"),
]


@pytest.mark.parametrize("flags, named", BAD_DEFAULTS, ids=[" ".join(f) for f, _ in BAD_DEFAULTS])
def test_serve_flags_are_checked_before_the_model_loads(flags, named, capsys):
    """One line, exit 2, and no model load (a missing --model would fail later, not here)."""
    rc = cli_main(["serve", "--model", "/nonexistent/checkpoint", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("unmask serve: error: ") and err.count("\n") == 1, err
    assert named in err and "nonexistent" not in err


def test_taken_port_is_one_line_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = cli_main(["serve", "--model", "/nonexistent/checkpoint", "--device", "cpu", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"unmask serve: error: port {port} is in use: pick another with --port\n"


def test_bind_gives_a_listening_socket_its_port():
    with bind("127.0.0.1", _free_port()) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"


# --- 4. size and the event loop -------------------------------------------------------------------

def test_body_over_the_cap_is_a_413(loaded):
    """Before: a 10 MB prompt was read, tokenized on the event loop and grew RSS by 1 GB."""
    with live_server(create_app(*loaded, ServeConfig(model_name=MODEL, max_body_bytes=64 * 1024))) as base:
        big = {"model": MODEL, "prompt": "x" * 10_000_000}
        assert_error(post(base, big), 413, code="request_too_large")

        def chunks():   # no Content-Length: the cap is enforced while reading
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(100):
                yield b"x" * 10_000
            yield b'"}'

        assert_error(post(base, chunks()), 413, code="request_too_large")
        assert post(base, {"model": MODEL, "prompt": "Mira", "max_tokens": 8}).status_code == 200


def test_tokenizing_a_long_prompt_does_not_stall_the_server(url):
    """The prompt is tokenized off the event loop: /health answers while it is; the prompt is then
    refused for the context (`context_length_exceeded`)."""
    result = {}
    sender = threading.Thread(target=lambda: result.update(r=post(url, {"model": MODEL, "prompt": "x" * 3_000_000})))
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.02)
    sender.join()
    assert_error(result["r"], 400, "prompt", "context_length_exceeded")
    assert slowest < 1.0, f"/health took {slowest:.2f} s while a prompt was tokenized"


# --- 5. errors in OpenAI's shape everywhere -------------------------------------------------------

MALFORMED = [
    ("non-utf8", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', {}, 400),
    ("deeply-nested", "POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, {}, 400),
    ("nested-in-a-field", "POST", "/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 500 + b"]" * 500 + b"}",
     {}, 400),
    ("array", "POST", "/v1/completions", b"[]", {}, 400),
    ("null", "POST", "/v1/chat/completions", b"null", {}, 400),
    ("empty", "POST", "/v1/chat/completions", b"", {}, 400),
    ("text-plain", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "hi"}', {"Content-Type": "text/plain"},
     415),
    ("form", "POST", "/v1/chat/completions", b"model=tiny", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("no-content-type", "POST", "/v1/completions", b'{"model": "tiny", "prompt": "hi"}', {"Content-Type": ""}, 415),
    ("unknown-route", "GET", "/v1/nope", b"", {}, 404),
    ("unknown-post-route", "POST", "/v1/embeddings", b"{}", {}, 404),
    ("wrong-method", "GET", "/v1/completions", b"", {}, 405),
    ("wrong-method-health", "POST", "/health", b"", {}, 405),
]


@pytest.mark.parametrize("name, method, path, body, headers, status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_shaped_errors(url, name, method, path, body, headers, status):
    """Before: {"detail": ...} or "invalid value for None"."""
    r = httpx.request(method, url + path, content=body, headers={"Content-Type": "application/json", **headers},
                      timeout=30)
    assert "detail" not in r.json()
    assert_error(r, status)
    assert httpx.get(url + "/health").status_code == 200


def test_malformed_request_through_the_official_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model=MODEL, input="hi")
    assert e.value.code == "not_found"


# --- 6. graceful shutdown -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(base: str, body: dict) -> dict:
    """One request's outcome: {"ok": finished} or {"ended": error} for a clean 503 or a stream's
    error event (followed by [DONE]); anything else fails the test."""
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        r.read()
    if r.status_code != 200:
        return {"ended": assert_error(r, 503, code="shutting_down")}
    if not body["stream"]:
        return {"ok": r.json()["choices"][0]["finish_reason"] in ("stop", "length")}
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    if "error" in chunks[-1]:
        assert chunks[-1]["error"]["code"] == "shutting_down"
        return {"ended": chunks[-1]["error"]}
    return {"ok": any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)}


@pytest.mark.slow   # each case starts an `unmask serve` process
@pytest.mark.parametrize("grace, extra, outcome", [
    (60, {"max_tokens": 64}, "ok"),                                                   # finishes within the grace
    (1, {"max_tokens": 448, "steps": 448, "block_length": 32, "cfg_scale": 1.0}, "ended"),   # cut at the grace
], ids=["finish", "end-cleanly"])
def test_sigterm_drains_in_flight_requests(tiny_checkpoint, tmp_path, grace, extra, outcome):
    """Before: SIGTERM with 20 requests in flight gave 15 plain-text 500s, 5 streams cut without
    [DONE], 20 tracebacks, and /health refused connections. Now the server keeps listening, answers
    503 to /health and new requests, finishes (or, past the grace, cleanly ends) what it accepted,
    and exits 0."""
    port, log = _free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "unmask.cli", "serve", "--model", str(tiny_checkpoint),
                                 "--served-model-name", MODEL, "--device", "cpu", "--port", str(port),
                                 "--max-tokens-limit", "448", "--shutdown-grace", str(grace),
                                 "--batch-window-ms", "500"],   # all 20 are accepted before a batch ends
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(base, proc)
        bodies = [{"model": MODEL, "prompt": f"Story {i}:", "stream": i % 2 == 0, **extra} for i in range(20)]
        with ThreadPoolExecutor(20) as pool:
            answers = [pool.submit(_ask, base, b) for b in bodies]
            deadline = time.monotonic() + 30
            while _metric(base, "unmask_requests_in_flight") + _metric(base, "unmask_queue_depth") < 20:
                assert time.monotonic() < deadline, "the 20 requests were not all accepted"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            health = _poll_health_until(base, 503)
            assert_error(post(base, {"model": MODEL, "prompt": "late", "max_tokens": 8}), 503, code="shutting_down")
            results = [a.result(timeout=120) for a in answers]
        assert proc.wait(timeout=grace + 20) == 0
        drained_in = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert health.json()["error"]["code"] == "unavailable"
    assert "Traceback" not in text, text
    assert all(outcome in r for r in results), results
    assert drained_in < grace + 10



def _poll_health_until(base: str, status: int) -> httpx.Response:
    """/health must keep answering (never a refused connection) until it reports `status`."""
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(base + "/health", timeout=5)
        if r.status_code == status:
            return r
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _metric(base: str, name: str) -> float:
    line = next(l for l in httpx.get(base + "/metrics").text.splitlines() if l.startswith(name + " "))
    return float(line.split()[1])


# --- 7. operator basics ---------------------------------------------------------------------------

def test_api_key_guards_v1_only(loaded):
    with live_server(create_app(*loaded, ServeConfig(model_name=MODEL, api_key="s3cret"))) as base:
        wrong = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert_error(post(base, {"model": MODEL, "prompt": "hi"}), 401, code="invalid_api_key")   # no header
        authorized = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in authorized.models.list().data] == [MODEL]
        assert authorized.completions.create(model=MODEL, prompt="Mira", max_tokens=8).choices[0].text is not None
        for open_path in ("/health", "/metrics", "/"):
            assert httpx.get(base + open_path).status_code == 200
        assert '"api_key": true' in httpx.get(base + "/").text


def test_cors_is_off_by_default_and_follows_the_allow_list(url, loaded):
    origin = {"Origin": "https://app.example"}
    assert "access-control-allow-origin" not in httpx.get(url + "/v1/models", headers=origin).headers
    config = ServeConfig(model_name=MODEL, allowed_origins=("https://app.example",))
    with live_server(create_app(*loaded, config)) as base:
        allowed = httpx.get(base + "/v1/models", headers=origin)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(base + "/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = httpx.options(base + "/v1/chat/completions", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200


# --- 8. (loadtest part) and 12. (web page part) ---------------------------------------------------

def test_loadtest_without_a_server_is_one_line():
    with pytest.raises(ValueError, match=r"cannot reach http://127\.0\.0\.1:\d+: connection refused; is "
                                         r"`unmask serve` running\?"):
        run_loadtest(LoadTest(url=f"http://127.0.0.1:{_free_port()}", requests=1, concurrency=1))


@pytest.mark.parametrize("name, chat", [("tiny", False), ("unmask", False), ("LLaDA-8B-Base", False),
                                        ("LLaDA-8B-Instruct", True)])
def test_page_ticks_the_chat_template_only_for_chat_models(loaded, name, chat):
    """Before: the page started with the chat template ticked, also for a base model (the bundled one)."""
    with live_server(create_app(*loaded, ServeConfig(model_name=name))) as base:
        page = httpx.get(base + "/").text
    assert f'const PAGE = {{"chat": {json.dumps(chat)}, "api_key": false, "block_diffusion": false}};' in page


# --- issue 22 (hardening, round two) --------------------------------------------------------------

@contextmanager
def uvicorn_log():
    """The records uvicorn logs (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_a_prompt_longer_than_the_context_can_spell_is_refused_untokenized(url):
    """Before: a 4 MB prompt was tokenized (~11 s) before being refused for the context."""
    started = time.monotonic()
    error = assert_error(post(url, {"model": MODEL, "prompt": "x" * 4_000_000}), 400, "prompt",
                         "context_length_exceeded")
    assert "characters" in error["message"] and time.monotonic() - started < 5


def test_special_token_floods_do_not_delay_other_requests(url):
    """Before: four 3.8 MiB chat bodies of <|eot|> delayed an 8-token request to 86.6 s."""
    flood = {"model": MODEL, "messages": [{"role": "user", "content": "<|eot|>" * 570_000}]}
    with ThreadPoolExecutor(5) as pool:
        floods = [pool.submit(post, url, flood, "/v1/chat/completions") for _ in range(4)]
        time.sleep(0.2)
        started = time.monotonic()
        normal = post(url, {"model": MODEL, "prompt": "Mira lives in", "max_tokens": 8}, timeout=20)
        took = time.monotonic() - started
        for f in floods:
            assert_error(f.result(), 400, "messages", "context_length_exceeded")
    assert normal.status_code == 200 and took < 10, (normal.status_code, took)


def test_special_token_text_in_a_message_is_tokenized_in_a_few_calls(loaded, monkeypatch):
    """Before: one tokenizer call per special-token piece (2,001 for 1,000 <|eot|>)."""
    from transformers import PreTrainedTokenizerBase

    from unmask.serve.prompts import PromptEncoder

    encoder = PromptEncoder(loaded[1])
    expected = encoder.chat([{"role": "user", "content": "<|eot|>"}])
    calls = []
    original = PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", lambda self, *a, **k: calls.append(1) or original(
        self, *a, **k))
    ids = encoder.chat([{"role": "user", "content": "<|eot|>" * 1000}])
    assert len(calls) <= 2, len(calls)
    eot_as_text = expected[-len("<|eot|>") - 3:-3]   # the content sits before the template's <|eot|><|assistant|>\n
    assert ids == expected[:-len("<|eot|>") - 3] + eot_as_text * 1000 + expected[-3:]


def _slow_prompts(server, monkeypatch, seconds: float) -> None:
    """Make tokenizing a prompt that starts with "slow" take `seconds`."""
    original = server.prompts.completion

    def completion(text, infill=False):
        if text.startswith("slow"):
            time.sleep(seconds)
        return original(text, infill)

    monkeypatch.setattr(server.prompts, "completion", completion)


def test_the_timeout_covers_tokenizing(loaded, monkeypatch):
    """Before: --timeout started after tokenizing, so a prompt that took long to tokenize still ran."""
    app = create_app(*loaded, ServeConfig(model_name=MODEL, timeout_s=0.5))
    _slow_prompts(app.state.server, monkeypatch, 2.0)
    with live_server(app) as base:
        started = time.monotonic()
        assert_error(post(base, {"model": MODEL, "prompt": "slow prompt", "max_tokens": 8}), 504, code="timeout")
        assert time.monotonic() - started < 1.8


def test_one_slow_prompt_does_not_queue_the_others(loaded, monkeypatch):
    """Before: one tokenizer thread, so every prompt waited for the slow one."""
    app = create_app(*loaded, ServeConfig(model_name=MODEL))
    _slow_prompts(app.state.server, monkeypatch, 4.0)
    with live_server(app) as base, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, base, {"model": MODEL, "prompt": "slow prompt", "max_tokens": 8})
        time.sleep(0.3)
        started = time.monotonic()
        assert post(base, {"model": MODEL, "prompt": "quick", "max_tokens": 8}).status_code == 200
        assert time.monotonic() - started < 3.0
        assert slow.result().status_code == 200


def _sent_before_close(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sends on `sock` until it closes it, or None if it is still open after
    `seconds` (a reply can take several reads: headers and body may come in separate segments)."""
    sock.settimeout(seconds)
    parts = []
    try:
        while chunk := sock.recv(65536):
            parts.append(chunk)
    except (TimeoutError, socket.timeout):
        return None
    except ConnectionResetError:
        pass
    return b"".join(parts)


def test_slow_clients_are_timed_out(loaded):
    """Before: a connection that sent nothing, trickled its headers or stopped mid-body stayed open."""
    config = ServeConfig(model_name=MODEL, header_timeout_s=0.5, body_timeout_s=0.5)
    with live_server(create_app(*loaded, config)) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as silent:
            assert _sent_before_close(silent, 3) is not None
        with socket.create_connection(("127.0.0.1", port)) as trickle:
            trickle.sendall(b"POST /v1/completions HTTP/1.1\r\n")
            deadline = time.monotonic() + 3
            with pytest.raises(OSError):
                while time.monotonic() < deadline:
                    trickle.sendall(b"X-Slow: 1\r\n")
                    time.sleep(0.1)
                    if _sent_before_close(trickle, 0.01) is not None:
                        raise OSError("closed")
        with socket.create_connection(("127.0.0.1", port)) as partial:
            partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"model\"")
            reply = _sent_before_close(partial, 3)
        assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply, reply
        assert post(base, {"model": MODEL, "prompt": "Mira", "max_tokens": 8}).status_code == 200


def test_open_connections_are_capped(loaded):
    config = ServeConfig(model_name=MODEL, max_connections=2)
    with live_server(create_app(*loaded, config)) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port)):
            time.sleep(0.2)
            assert httpx.get(base + "/health").status_code == 503
        time.sleep(0.2)
        assert httpx.get(base + "/health").status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": "\\ud800"}]}]}', "messages.0.content.0.text"),
], ids=["prompt", "chat", "chat-part"])
def test_a_lone_surrogate_is_a_400_naming_the_field(url, path, body, param):
    """Before: a 500 naming an internal type, with a traceback in the log."""
    with uvicorn_log() as records:
        error = assert_error(post(url, body, path), 400, param, "invalid_text")
    assert "surrogate" in error["message"]
    assert not [r for r in records if r.exc_info]


def test_client_errors_are_counted_and_logged_as_what_the_client_got(url):
    """Before: a 5,000-digit integer was a 400 with code null, counted as a 500 and logged as an
    ERROR traceback; so was a client that left mid-body."""
    before = wait_idle(url)
    with uvicorn_log() as records:
        assert_error(post(url, '{"model": "tiny", "prompt": "hi", "seed": ' + "7" * 5000 + "}"), 400,
                     code="invalid_json")
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as leaving:
            leaving.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{\"model\"")
            time.sleep(0.2)
        time.sleep(0.5)
        after = metrics(url)
    key = 'unmask_requests_total{endpoint="/v1/completions",status="%s"}'
    assert after.get(key % 500, 0) == before.get(key % 500, 0)
    assert after[key % 400] == before.get(key % 400, 0) + 1
    assert after[key % 499] == before.get(key % 499, 0) + 1
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in records]


def test_a_refused_cors_preflight_is_openai_shaped(loaded):
    config = ServeConfig(model_name=MODEL, allowed_origins=("https://app.example",))
    with live_server(create_app(*loaded, config)) as base:
        refused = httpx.options(base + "/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "origin" in assert_error(refused, 400, code="cors_refused")["message"].lower()


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_no_api_docs_pages(loaded, path):
    """Before: served without the key, /docs loading scripts from a CDN."""
    with live_server(create_app(*loaded, ServeConfig(model_name=MODEL, api_key="s3cret"))) as base:
        assert_error(httpx.get(base + path), 404, code="not_found")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "mira"}]}, "messages.0.name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "diffusion_progress": True},
     "diffusion_progress"),
    ("/v1/completions", {"prompt": "hi", "diffusion_progress": True}, "diffusion_progress"),
], ids=["name", "chat-progress", "completion-progress"])
def test_fields_the_server_would_ignore_are_refused(url, path, body, param):
    """Before: a message's name and diffusion_progress without stream were silently ignored."""
    assert_error(post(url, {"model": MODEL, "max_tokens": 8, **body}, path), 400, param)


@pytest.mark.slow   # starts an `unmask serve` process
def test_a_second_signal_that_cuts_requests_exits_non_zero(tiny_checkpoint, tmp_path):
    """Before: a second SIGTERM cut the running stream off and the process still exited 0."""
    port, log = _free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "unmask.cli", "serve", "--model", str(tiny_checkpoint),
                                 "--served-model-name", MODEL, "--device", "cpu", "--port", str(port),
                                 "--max-tokens-limit", "448", "--shutdown-grace", "60"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(base, proc)
        body = {"model": MODEL, "prompt": "Story:", "stream": True, "max_tokens": 448, "steps": 448,
                "block_length": 32, "cfg_scale": 1.0}
        with ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: httpx.post(base + "/v1/completions", json=body, timeout=120))
            deadline = time.monotonic() + 30
            while _metric(base, "unmask_requests_in_flight") < 1:
                assert time.monotonic() < deadline, "the request was not accepted"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            _poll_health_until(base, 503)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "cut off" in log.read_text()
