"""A small, bounded load generator for an unmask (or any OpenAI-compatible) server.

N workers share M chat requests; each records its latency (and, streaming, the time to the first
text). The run is bounded in count (at most 10,000 requests) and time (`duration_s`, after which
no new request starts), and by default only talks to loopback addresses, so it cannot be turned
into a tool for loading someone else's server by accident.

`run_levels` runs one such test per concurrency (`unmask loadtest --concurrency 1 8 32`), each
after `warmup` uncounted requests, so a server's one-time costs (a CUDA graph captured for each new
batch shape) stay out of the throughput it reports: one table row per level.

`run_open_loop` is the open-loop mode (`unmask loadtest --open-loop`): requests arrive on their own
clock (Poisson arrivals at --rate, or the times a trace file gives), whether or not earlier ones are
done, as real traffic does; each streams, so the time to first text is measured too. The requests
come from a trace file (one JSON object a line: prompt, max_tokens, temperature, cfg_scale, seed,
optionally `at` in seconds) or a preset (`mixed`: mixed max_tokens, temperature and cfg_scale).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

MAX_REQUESTS = 10_000
TRACE_FIELDS = {"at", "prompt", "max_tokens", "temperature", "cfg_scale", "seed", "steps", "block_length", "guidance",
                "threshold", "cache", "reuse_uncond"}
MIXED_PROMPTS = ("Tell me about the river.", "Where does Mira live?", "What is north of the old mill?",
                 "Describe the bridge.", "Who keeps the lighthouse?", "Name a colour.")


@dataclass
class LoadTest:
    url: str = "http://127.0.0.1:8000"
    concurrency: int = 8
    requests: int = 64
    max_tokens: int = 32
    prompt: str = "Tell me about the river."
    stream: bool = False
    duration_s: float = 120.0
    request_timeout_s: float = 300.0
    allow_remote: bool = False
    api_key: str | None = None
    warmup: int = 0               # requests sent first and not counted (at this concurrency)


@dataclass
class Report:
    concurrency: int = 0
    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    first_text: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    wall_s: float = 0.0

    def format(self) -> str:
        lines = [f"requests: {self.sent} sent, {self.ok} ok, {self.errors} errors in {self.wall_s:.2f} s",
                 f"throughput: {self.ok / self.wall_s:.2f} req/s, {self.completion_tokens / self.wall_s:.1f} "
                 "completion tokens/s" if self.wall_s else "throughput: n/a"]
        for name, xs in (("latency", self.latencies), ("time to first text", self.first_text)):
            if xs:
                p = {q: percentile(xs, q) for q in (50, 95, 99)}
                lines.append(f"{name}: p50 {p[50] * 1000:.0f} ms, p95 {p[95] * 1000:.0f} ms, "
                             f"p99 {p[99] * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms")
        if self.error_kinds:
            lines.append("errors: " + ", ".join(f"{k} x{n}" for k, n in self.error_kinds.most_common()))
        return "\n".join(lines)


LEVEL_COLUMNS = ("concurrency", "ok", "errors", "req/s", "completion tokens/s", "latency p50 ms", "latency p95 ms")


def format_levels(reports: list[Report]) -> str:
    """One Markdown table row per concurrency level (`run_levels`)."""
    lines = ["| " + " | ".join(LEVEL_COLUMNS) + " |", "|---" * len(LEVEL_COLUMNS) + "|"]
    for r in reports:
        rates = [f"{r.ok / r.wall_s:.2f}", f"{r.completion_tokens / r.wall_s:.1f}"] if r.wall_s else ["n/a"] * 2
        ms = [f"{percentile(r.latencies, q) * 1000:.0f}" if r.latencies else "n/a" for q in (50, 95)]
        lines.append("| " + " | ".join(map(str, [r.concurrency, r.ok, r.errors, *rates, *ms])) + " |")
    return "\n".join(lines)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def check_loopback(url: str) -> None:
    """Refuse URLs whose host does not resolve only to loopback addresses."""
    host = urlparse(url).hostname
    if not host:
        raise ValueError(f"no host in --url {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{host} is not a loopback address; pass --allow-remote to load a remote server")


class StreamError(Exception):
    """An error event inside a 200 stream (e.g. a timeout after the headers were sent)."""


async def _one(client, cfg: LoadTest, model: str, report: Report, request: dict | None = None) -> None:
    """Send one chat request (`request`: a trace entry's fields, else cfg's prompt and max_tokens)."""
    fields = {"prompt": cfg.prompt, "max_tokens": cfg.max_tokens, **(request or {})}
    fields.pop("at", None)
    body = {"model": model, "messages": [{"role": "user", "content": fields.pop("prompt")}], **fields}
    started = time.monotonic()
    try:
        if cfg.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    report.error_kinds[f"HTTP {r.status_code}"] += 1
                    report.errors += 1
                    return
                first = None
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise StreamError(chunk["error"].get("code") or "stream error")
                    if chunk.get("usage"):
                        report.completion_tokens += chunk["usage"]["completion_tokens"]
                    if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                        first = time.monotonic() - started
                if first is not None:
                    report.first_text.append(first)
        else:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                report.error_kinds[f"HTTP {r.status_code}"] += 1
                report.errors += 1
                return
            report.completion_tokens += r.json()["usage"]["completion_tokens"]
    except Exception as e:  # count and go on: a load test reports failures, it does not stop at one
        report.error_kinds[str(e) if isinstance(e, StreamError) else type(e).__name__] += 1
        report.errors += 1
        return
    report.ok += 1
    report.latencies.append(time.monotonic() - started)


async def _served_model(client, url: str) -> str:
    """The server's model id, or a ValueError (one line from the CLI) saying why there is none."""
    import httpx

    try:
        r = await client.get("/v1/models")
    except httpx.ConnectError:
        raise ValueError(f"cannot reach {url}: connection refused; is `unmask serve` running?") from None
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise ValueError(f"{url}/v1/models answered {r.status_code}: {r.text[:300]}")
    return r.json()["data"][0]["id"]


async def _run(cfg: LoadTest) -> Report:
    import httpx

    limits = httpx.Limits(max_connections=cfg.concurrency)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), timeout=cfg.request_timeout_s, limits=limits,
                                 headers=headers) as client:
        model = await _served_model(client, cfg.url)
        stop_at = time.monotonic() + cfg.duration_s
        if cfg.warmup:
            await _send(client, cfg, model, cfg.warmup, stop_at, Report())
        return await _send(client, cfg, model, cfg.requests, stop_at, Report(concurrency=cfg.concurrency))


async def _send(client, cfg: LoadTest, model: str, requests: int, stop_at: float, report: Report) -> Report:
    """`requests` requests from cfg.concurrency workers; none starts after `stop_at`."""
    remaining = iter(range(requests))

    async def worker():
        for _ in remaining:
            if time.monotonic() > stop_at:
                return
            report.sent += 1
            await _one(client, cfg, model, report)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    report.wall_s = time.monotonic() - started
    return report


def run_loadtest(cfg: LoadTest) -> Report:
    return run_levels(cfg, [cfg.concurrency])[0]


def run_levels(cfg: LoadTest, concurrencies: list[int]) -> list[Report]:
    """One load test per concurrency in turn, each of cfg.requests requests after cfg.warmup
    uncounted ones; every level is checked before the first is sent."""
    if not 1 <= cfg.requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be between 1 and {MAX_REQUESTS}")
    if not 0 <= cfg.warmup <= MAX_REQUESTS:
        raise ValueError(f"--warmup must be between 0 and {MAX_REQUESTS}")
    if not concurrencies or not all(1 <= c <= min(cfg.requests, 256) for c in concurrencies):
        raise ValueError("--concurrency must be between 1 and min(--requests, 256)")
    if not cfg.allow_remote:
        check_loopback(cfg.url)
    return [asyncio.run(_run(replace(cfg, concurrency=c))) for c in concurrencies]


def mixed_trace(requests: int, rate: float, seed: int = 0) -> list[dict]:
    """The `mixed` preset: Poisson arrivals at `rate` per second, each request with its own
    max_tokens (16, 32 or 64), temperature (0, or 0.7 with a seed) and cfg_scale (0 or 1)."""
    rng = random.Random(seed)
    trace, at = [], 0.0
    for i in range(requests):
        temperature = rng.choice((0.0, 0.7))
        entry = {"at": round(at, 4), "prompt": rng.choice(MIXED_PROMPTS), "max_tokens": rng.choice((16, 32, 64)),
                 "temperature": temperature, "cfg_scale": rng.choice((0.0, 1.0))}
        if temperature:
            entry["seed"] = i
        trace.append(entry)
        at += rng.expovariate(rate)
    return trace


def read_trace(path: str | Path, rate: float | None, seed: int = 0) -> list[dict]:
    """A trace file: one JSON object a line with the fields in TRACE_FIELDS (prompt required).
    Entries without `at` arrive as a Poisson process at `rate` per second."""
    trace, at, rng = [], 0.0, random.Random(seed)
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(entry, dict) or "prompt" not in entry or set(entry) - TRACE_FIELDS:
            raise ValueError(f"{path}:{n}: each line must be an object with a prompt and only the fields "
                             f"{', '.join(sorted(TRACE_FIELDS))}")
        if "at" not in entry:
            if rate is None:
                raise ValueError(f"{path}:{n}: no arrival time ('at'): give --rate for Poisson arrivals")
            entry["at"] = at
            at += rng.expovariate(rate)
        trace.append(entry)
    if not trace:
        raise ValueError(f"{path}: the trace is empty")
    return sorted(trace, key=lambda e: e["at"])


def run_open_loop(cfg: LoadTest, trace: list[dict]) -> Report:
    """Send every trace entry at its arrival time (open loop), streaming; the report's wall time runs
    from the first arrival to the last answer."""
    if not 1 <= len(trace) <= MAX_REQUESTS:
        raise ValueError(f"a trace holds between 1 and {MAX_REQUESTS} requests")
    if not cfg.allow_remote:
        check_loopback(cfg.url)
    return asyncio.run(_open_loop(replace(cfg, stream=True), trace))


async def _open_loop(cfg: LoadTest, trace: list[dict]) -> Report:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    limits = httpx.Limits(max_connections=len(trace))
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), timeout=cfg.request_timeout_s, limits=limits,
                                 headers=headers) as client:
        model = await _served_model(client, cfg.url)
        report = Report(concurrency=0)
        started = time.monotonic()

        async def arrive(entry: dict) -> None:
            await asyncio.sleep(max(0.0, started + entry["at"] - time.monotonic()))
            report.sent += 1
            await _one(client, cfg, model, report, entry)

        await asyncio.gather(*(arrive(e) for e in trace if e["at"] <= cfg.duration_s))
        report.wall_s = time.monotonic() - started
        return report
