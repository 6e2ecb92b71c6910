"""A small, bounded load generator for an unmask (or any OpenAI-compatible) server.

N workers share M chat requests; each records its latency (and, streaming, the time to the first
text). The run is bounded in count (at most 10,000 requests) and time (`duration_s`, after which
no new request starts), and by default only talks to loopback addresses, so it cannot be turned
into a tool for loading someone else's server by accident.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

MAX_REQUESTS = 10_000


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


@dataclass
class Report:
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


async def _one(client, cfg: LoadTest, model: str, report: Report) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": cfg.prompt}], "max_tokens": cfg.max_tokens}
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


async def _run(cfg: LoadTest) -> Report:
    import httpx

    report, stop_at = Report(), time.monotonic() + cfg.duration_s
    limits = httpx.Limits(max_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), timeout=cfg.request_timeout_s, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        remaining = iter(range(cfg.requests))

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
    if not 1 <= cfg.requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be between 1 and {MAX_REQUESTS}")
    if not 1 <= cfg.concurrency <= min(cfg.requests, 256):
        raise ValueError("--concurrency must be between 1 and min(--requests, 256)")
    if not cfg.allow_remote:
        check_loopback(cfg.url)
    return asyncio.run(_run(cfg))
