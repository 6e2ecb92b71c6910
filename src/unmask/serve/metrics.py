"""Prometheus text exposition for the server, without a client library.

A few counters, gauges and histograms are all a single-process server needs; writing the text
format (version 0.0.4) directly keeps `prometheus_client` out of the dependencies. Updates come
from both the event loop and the generation thread, so every metric takes one shared lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

LOCK = threading.Lock()
RATE_WINDOW_S = 10.0


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    return "+Inf" if v == float("inf") else repr(float(v))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with LOCK:
            self.values[key] = self.values.get(key, 0.0) + amount

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge:
    """A value read at scrape time from `read` (queue depth and the like are owned elsewhere)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def samples(self) -> list[str]:
        return [f"{self.name} {_num(self.read())}"]


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.buckets = tuple(sorted(buckets)) + (float("inf"),)
        self.series: dict[tuple, list] = {}   # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with LOCK:
            s = self.series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    s[i] += 1
            s[-2] += value
            s[-1] += 1

    def samples(self) -> list[str]:
        out = []
        for key, s in sorted(self.series.items()):
            for bound, n in zip(self.buckets, s):
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {n}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {s[-1]}")
        return out


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """Everything /metrics reports; `queue_depth` and `in_flight` are read from the scheduler."""

    def __init__(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]):
        self.requests = Counter("unmask_requests_total", "HTTP requests answered, by endpoint and status code",
                                ("endpoint", "status"))
        self.cancelled = Counter("unmask_requests_cancelled_total",
                                 "Requests whose client went away or timed out before their text was complete")
        self.prompt_tokens = Counter("unmask_prompt_tokens_total", "Prompt tokens processed")
        self.generated_tokens = Counter("unmask_generated_tokens_total", "Completion tokens returned")
        self.batches = Counter("unmask_batches_total", "Sampler steps of the running rows, and whole sampler calls")
        self.queue_depth = Gauge("unmask_queue_depth", "Requests waiting for a batch", queue_depth)
        self.in_flight = Gauge("unmask_requests_in_flight", "Requests in the batch being generated", in_flight)
        self.last_tokens_per_second = 0.0
        self._recent: deque[tuple[float, float, int]] = deque()   # (when, step seconds, tokens finished)
        self.tokens_per_second = Gauge("unmask_tokens_per_second",
                                       "Completion tokens per second of the recent steps (or the last whole call)",
                                       lambda: self.last_tokens_per_second)
        self.latency = Histogram("unmask_request_latency_seconds", "Time from request to its last byte",
                                 LATENCY_BUCKETS, ("endpoint",))
        self.first_token = Histogram("unmask_time_to_first_token_seconds",
                                     "Streaming: time from request to the first committed text", LATENCY_BUCKETS)
        self.batch_size = Histogram("unmask_batch_size", "Rows per sampler step (or per whole sampler call)",
                                    (1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("unmask_batch_duration_seconds",
                                       "Wall time of one sampler step (or whole sampler call)",
                                       LATENCY_BUCKETS)

    def record_batch(self, size: int, seconds: float, tokens: int) -> None:
        self.batches.inc()
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)
        if tokens and seconds > 0:   # a batch whose rows were all cancelled says nothing about speed
            self.last_tokens_per_second = tokens / seconds

    def record_step(self, rows: int, seconds: float, tokens: int) -> None:
        """One continuous-batching step of `rows` rows, in which rows totalling `tokens` completion
        tokens finished. Tokens per second is over the steps of the last RATE_WINDOW_S seconds:
        rows finish at different steps, so one step alone says nothing about speed."""
        self.batches.inc()
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)
        now = time.monotonic()
        self._recent.append((now, seconds, tokens))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        busy, done = sum(s for _, s, _ in self._recent), sum(t for _, _, t in self._recent)
        if done and busy > 0:
            self.last_tokens_per_second = done / busy

    def render(self) -> str:
        lines = []
        for m in vars(self).values():
            if hasattr(m, "samples"):
                lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.samples()]
        return "\n".join(lines) + "\n"
