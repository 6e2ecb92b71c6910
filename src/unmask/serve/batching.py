"""Dynamic batching: concurrent requests with the same sampler settings share one `generate` call.

Why it pays: every diffusion step is one forward pass over the whole canvas, so B rows cost
little more than one on an accelerator. Requests only batch when their settings match
(`SamplingParams`); prompts of different lengths are left-padded with an attention mask, which
leaves each row's result equal to running it alone.

Two halves, one per thread:
- `Scheduler` (event loop): a bounded FIFO of `Job`s. When idle it waits a short window for
  companions, then takes the oldest job and up to max_batch_size-1 later jobs with the same key,
  and hands them to the worker thread. Cancelled and expired jobs are dropped before they start.
- `BatchRunner` (worker thread): runs the batch; after every step its callback turns each row's
  canvas into stable text (`RowText`) and posts events to the row's job. A row is done when its
  text has ended, its client left, or its deadline passed; when every row is done the batch stops
  early — committed tokens never change, so stopping cannot alter any row's text.
Only one batch runs at a time: a single model instance, and steps already saturate the device.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling import StepState, generate, left_pad
from .metrics import ServerMetrics
from .textstream import Ending, RowText, piece_decoder

log = logging.getLogger("unmask.serve")


@dataclass(frozen=True)
class SamplingParams:
    """Everything that must match for two requests to share a batch."""

    steps: int
    gen_length: int
    block_length: int
    temperature: float
    cfg_scale: float
    remasking: str
    threshold: float | None = None
    cache: str | None = None
    reuse_uncond: bool = False

    @property
    def stochastic(self) -> bool:
        return self.temperature > 0 or self.remasking == "random"


# Events posted to a job, in order: any number of Updates, then one Finished or Failed.
@dataclass
class Update:
    text: str                      # newly committed text (may be empty when only progress changed)
    progress: dict | None = None   # the canvas view, for diffusion_progress requests


@dataclass
class Finished:
    text: str                      # the last new text
    ending: Ending
    progress: dict | None = None


@dataclass
class Failed:
    error: Exception


class QueueFull(Exception):
    """The waiting queue is at its limit; the client should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (HTTP 503)."""


class RequestTimeout(Exception):
    """The request passed its deadline before its text was complete (HTTP 504)."""


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request's row: its input, where its events go, and whether anyone still wants it."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    deadline: float                          # time.monotonic() after which it is abandoned
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False                     # post Updates as text is committed (else only the end)
    progress: bool = False                   # with the canvas view (diffusion_progress)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False                  # set by the event loop; read by the worker thread
    done: bool = False                       # set once its last event is posted

    @property
    def key(self) -> Any:
        """Batch key: a seeded stochastic request runs alone, because batch-mates would draw its noise."""
        return (self.params, self.id) if self.params.stochastic and self.seed is not None else self.params

    def post(self, event) -> None:
        """Deliver an event from any thread; the final one marks the job done."""
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _BatchDone(Exception):
    """Raised from the step callback to stop a batch whose rows are all done."""


class BatchRunner:
    """Runs a list of jobs as one `generate` call, in the worker thread."""

    def __init__(self, model, tokenizer, *, mask_id: int, pad_id: int, eos_id: int | None, end_ids: set[int],
                 metrics: ServerMetrics):
        self.model, self.tokenizer = model, tokenizer
        self.mask_id, self.pad_id, self.eos_id, self.end_ids = mask_id, pad_id, eos_id, end_ids
        self.metrics = metrics
        self.piece = piece_decoder(tokenizer)
        self.device = next(model.parameters()).device

    def run(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        params = jobs[0].params
        rows = [RowText(self.tokenizer, self.mask_id, self.end_ids, j.stop) for j in jobs]
        views = [_CanvasView(params, self.mask_id) if j.progress else None for j in jobs]
        ids, attention = left_pad([j.prompt for j in jobs], self.pad_id)
        seed = jobs[0].seed if len(jobs) == 1 else None
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None

        def on_step(state: StepState) -> None:
            gen = state.x[:, state.prompt_length:].tolist()
            committed = state.committed[:, state.prompt_length:]
            confidence = state.confidence[:, state.prompt_length:]
            now = time.monotonic()
            for r, job in enumerate(jobs):
                if job.done:
                    continue
                if job.cancelled:
                    job.done = True
                    continue
                if now > job.deadline:
                    job.post(Failed(RequestTimeout("generation did not finish within the request timeout")))
                    continue
                progress = views[r].step(state, gen[r], committed[r], confidence[r], self.piece) if views[r] else None
                self._post(job, rows[r], gen[r], progress)
            if all(j.done for j in jobs):
                raise _BatchDone

        kwargs = dict(steps=params.steps, gen_length=params.gen_length, block_length=params.block_length,
                      temperature=params.temperature, cfg_scale=params.cfg_scale, remasking=params.remasking,
                      mask_id=self.mask_id, attention_mask=attention.to(self.device), generator=generator,
                      eos_token_id=self.eos_id, eos_last=self.eos_id is not None,
                      stop_at_eos=self.eos_id is not None, callback=on_step)
        kwargs.update({k: v for k, v in (("threshold", params.threshold), ("cache", params.cache),
                                         ("reuse_uncond", params.reuse_uncond or None)) if v is not None})
        try:
            x = generate(self.model, ids.to(self.device), **kwargs)
            for r, job in enumerate(jobs):   # rows whose text ran to the last position
                if not job.done:
                    self._post(job, rows[r], x[r, ids.shape[1]:].tolist(), None, final=True)
        except _BatchDone:
            pass
        except Exception as e:  # one bad batch must not take the server down
            log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                if not job.done:
                    job.post(Failed(e))
        tokens = sum(r.ending.completion_tokens for r in rows if r.ending)
        self.metrics.record_batch(len(jobs), time.monotonic() - started, tokens)

    @staticmethod
    def _post(job: Job, row: RowText, gen: list[int], progress: dict | None, final: bool = False) -> None:
        text = row.update(gen, final=final)
        if row.ending is not None:
            job.post(Finished(text, row.ending, progress))
        elif (text and job.stream) or progress:
            job.post(Update(text, progress))


class _CanvasView:
    """One row's canvas for the live view: token texts (None = masked) and the confidence each had
    when it was committed, so a client can colour tokens without replaying the whole history."""

    def __init__(self, params: SamplingParams, mask_id: int):
        self.steps, self.mask_id = params.steps, mask_id
        self.commit_confidence: list[float | None] = [None] * params.gen_length

    def step(self, state: StepState, gen: list[int], committed: torch.Tensor, confidence: torch.Tensor,
             piece) -> dict:
        newly = committed.nonzero().flatten().tolist()
        for i, c in zip(newly, confidence[newly].tolist()):
            self.commit_confidence[i] = None if c != c else round(min(max(c, 0.0), 1.0), 4)   # c != c: nan
        return {
            "step": state.step, "block": state.block, "steps": self.steps, "committed": newly,
            "tokens": [None if t == self.mask_id else piece(t) for t in gen],
            "confidence": list(self.commit_confidence),
        }


class Scheduler:
    """The bounded queue and the loop that forms batches; lives on the event loop."""

    def __init__(self, runner: BatchRunner, *, max_batch_size: int, max_queue: int, window_s: float):
        self.runner = runner
        self.max_batch_size, self.max_queue, self.window_s = max_batch_size, max_queue, window_s
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self.closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unmask-generate")
        self._task: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def in_flight(self) -> int:
        return sum(not j.done for j in self.running)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, job: Job) -> None:
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
        self.pending.append(job)
        self._wakeup.set()

    async def close(self) -> None:
        """Refuse new work, fail what waits, stop the running batch, and wait for the worker."""
        self.closing = True
        for job in self.pending:
            job.post(Failed(ShuttingDown("the server is shutting down")))
        self.pending.clear()
        for job in self.running:
            job.cancelled = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.closing:
            await self._wakeup.wait()
            self._drop_dead()
            if not self.pending:
                self._wakeup.clear()
                continue
            if self.window_s and len(self.pending) < self.max_batch_size:
                await asyncio.sleep(self.window_s)
                self._drop_dead()
            batch = self._take_batch()
            if not batch:
                continue
            self.running = batch
            try:
                await loop.run_in_executor(self._executor, self.runner.run, batch)
            except Exception as e:  # the runner catches its own errors; this is the last guard
                log.exception("scheduler: batch failed")
                for job in batch:
                    if not job.done:
                        job.post(Failed(e))
            finally:
                self.running = []

    def _drop_dead(self) -> None:
        now, alive = time.monotonic(), []
        for job in self.pending:
            if job.cancelled:
                continue
            if now > job.deadline:
                job.post(Failed(RequestTimeout("the request waited in the queue past its timeout")))
                continue
            alive.append(job)
        self.pending = alive

    def _take_batch(self) -> list[Job]:
        if not self.pending:
            return []
        key = self.pending[0].key
        batch = [j for j in self.pending if j.key == key][: self.max_batch_size]
        chosen = set(map(id, batch))
        self.pending = [j for j in self.pending if id(j) not in chosen]
        return batch
