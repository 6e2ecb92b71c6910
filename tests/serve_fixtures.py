"""For the serve tests: a real uvicorn server in a background thread on a free loopback port, and
its /metrics read strictly."""

from __future__ import annotations

import re
import time

import httpx

from unmask.serve.lifecycle import serve_in_thread

live_server = serve_in_thread   # a real uvicorn server on a free loopback port: yields the base URL


def metrics(url) -> dict[str, float]:
    """Parse /metrics strictly (every line must be a comment or `name{labels} value`)."""
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-z_]+ .+", line), line
            continue
        m = re.fullmatch(r'([a-z_]+(?:\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})?) ([-+0-9.eE]+|\+Inf)', line)
        assert m, f"unparsable metrics line: {line!r}"
        values[m.group(1)] = float(m.group(2))
    return values


def wait_healthy(base: str, proc, timeout: float = 90) -> None:
    """Wait until the server process `proc` answers /health with 200 (it must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the server exited during startup"
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def wait_idle(url, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["unmask_requests_in_flight"] == 0 and m["unmask_queue_depth"] == 0:
            return m
        assert time.monotonic() < deadline, "the server did not free the request's slot"
        time.sleep(0.05)
