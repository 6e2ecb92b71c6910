"""Continuous batching: a request joins the running rows at the next denoising step, with its own
settings, and leaves as soon as its text has ended, its client left, or its deadline passed.

Why it pays: every diffusion step is one forward pass over all the rows, so B rows cost little
more than one; waiting for a whole batch (hundreds of steps) before starting a request that
arrived a moment later, or asks another max_tokens, temperature or cfg_scale, wastes that.
Rows that ask for different LoRA adapters (a server holding several) cannot share a pass: a step
runs one pass per adapter among its rows, each with that adapter active.

Two halves, one per thread:
- `Scheduler` (event loop): a bounded FIFO of `Job`s. Before every step it drops cancelled and
  expired jobs and admits waiting ones, oldest first, while the running rows stay within
  --max-batch-size rows and --max-batch-tokens canvas tokens (a guided row counts twice: it adds
  an unconditional row). Deadlines are arrival + --timeout, so FIFO is also earliest deadline first.
- `BatchRunner` (worker thread): `advance` starts the admitted rows (`sampling.rows.Row`, or
  `sampling.block_rows.BlockRow` for a LLaDA2.x model, with a generator seeded per request) and
  runs one step of every row (`sampling.rows.step` / `block_rows.block_step`): rows of
  different lengths and settings share the forward pass, and each row's text equals its request
  run alone (tests/test_rows.py). After the step, each row's canvas becomes stable text
  (`RowText`) posted to its job.

Rows of both families are stepped: LLaDA rows (`sampling.rows`, cache modes included, each row
with its own cache) and LLaDA2.x block-diffusion rows (`sampling.block_rows`, each with its own
exact cache of finished blocks). Whole-call groups: a request whose call is fixed as a whole cannot
join a running step: `cuda_graph` and `compile` (shapes captured or compiled for a whole call), a
block-diffusion checkpoint run by its own remote code (no cache), and a tensor-parallel server
(whose ranks replay whole sampler calls). When such a request reaches
the head of the queue, the running rows finish first, then it runs as one `generate` /
`block_generate` call together with the waiting requests of equal options; if that call fails, its
requests are retried one by one, so only the one that cannot run fails. A CUDA-graphed call is
padded to one of a few fixed shapes (`FixedShapes`): a graph is captured per (rows, canvas length)
and replayed only for that shape.

Only one step or call runs at a time: a single model instance, and steps already saturate the device.
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
import torch.nn.functional as F

from ..sampling import SamplerOptions, StepState, block_generate, generate, is_block_diffusion, left_pad
from ..sampling.block_rows import BlockRow, block_step, block_steppable
from ..sampling.generate import special_ids
from ..sampling.options import BlockOptions, context_length
from ..sampling.rows import Row, measure_pass_overhead, step, steppable
from .metrics import ServerMetrics
from .textstream import Ending, RowText, piece_decoder

log = logging.getLogger("unmask.serve")
GATHER_WINDOWS = 5   # an idle server waits at most this many batch windows for companions


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
    options: SamplerOptions | BlockOptions   # checked, also against the model and this prompt
    loop: asyncio.AbstractEventLoop
    deadline: float                          # time.monotonic() after which it is abandoned
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False                     # post Updates as text is committed (else only the end)
    progress: bool = False                   # with the canvas view (diffusion_progress)
    adapter: str | None = None               # the LoRA adapter it asks for (None: the base model)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False                  # set by the event loop; read by the worker thread
    posted: bool = False                     # set once any event is posted (a retry would repeat it)
    done: bool = False                       # set once its last event is posted

    @property
    def key(self) -> Any:
        """Batch key: the adapter and the options; a seeded stochastic request runs alone, because
        batch-mates would draw its noise."""
        alone = self.id if self.options.stochastic and self.seed is not None else None
        return self.adapter, self.options, alone

    @property
    def tokens(self) -> int:
        """What the row costs a step: its canvas, twice when guided (an unconditional row)."""
        return (len(self.prompt) + self.options.gen_length) * self.options.canvas_rows

    def abandoned(self, now: float) -> bool:
        """Whether nobody waits for the job's rows any more: it is done, or now ends it (its client
        left, or its deadline passed: the client gets the timeout)."""
        if self.cancelled:
            self.done = True
        elif now > self.deadline and not self.done:
            self.post(Failed(RequestTimeout("generation did not finish within the request timeout")))
        return self.done

    def post(self, event) -> None:
        """Deliver an event from any thread; the final one marks the job done."""
        self.posted = True
        if isinstance(event, (Finished, Failed)):
            self.done = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass(frozen=True)
class FixedShapes:
    """The shapes a graphed batch is padded to: rows 1, 2, 4, 8, 16, ... up to `max_rows` (the
    largest batch), and a prompt width that is a power of two, at least `min_width`. A stream of
    requests then meets a handful of shapes, each captured once and replayed after that (the graph
    runner keeps the `max_shapes` most recently used ones, see sampling/cuda_graph.py)."""

    max_rows: int
    min_width: int = 32

    def rows(self, n: int) -> int:
        return min(_power_of_two(n), self.max_rows)

    def width(self, n: int, limit: int | None = None) -> int:
        """The padded width of prompts at most `n` tokens long; at most `limit` (the context left
        after the generated part), but never less than `n`."""
        width = max(_power_of_two(n), self.min_width)
        return max(n, min(width, limit)) if limit is not None else width

    def pad(self, prompts: list[list[int]], pad_id: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`left_pad`, to a fixed shape. Neither kind of padding changes a row's output: extra
        columns are padding on the left (never attended, and positions count real tokens only),
        and an extra row repeats the first prompt, to be ignored (a row of padding alone would
        attend to nothing)."""
        prompts = prompts + [prompts[0]] * (self.rows(len(prompts)) - len(prompts))
        ids, attention = left_pad(prompts, pad_id)
        extra = self.width(ids.shape[1], limit) - ids.shape[1]
        return F.pad(ids, (extra, 0), value=pad_id), F.pad(attention, (extra, 0), value=0)


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


class _BatchDone(Exception):
    """Raised from the step callback to stop a batch whose rows are all done."""


@dataclass(eq=False)
class Running:
    """A job's row while it runs: its decoding state, its text so far and its live view."""

    job: Job
    row: Row | BlockRow
    text: RowText
    view: _CanvasView | None
    started: float = field(default_factory=time.monotonic)


class BatchRunner:
    """Runs rows step by step (`advance`) or a whole-call group (`run`), in the worker thread."""

    def __init__(self, model, tokenizer, *, mask_id: int, pad_id: int, eos_id: int | None, end_ids: set[int],
                 metrics: ServerMetrics, shapes: FixedShapes | None = None, adapters=None):
        self.model, self.tokenizer = model, tokenizer
        self.adapters = adapters   # an AdapterSet beside the model (None: the model alone)
        self.shapes = shapes   # what graphed batches are padded to (None: never padded)
        self.mask_id, self.pad_id, self.eos_id, self.end_ids = mask_id, pad_id, eos_id, end_ids
        self.metrics = metrics
        self.piece = piece_decoder(tokenizer)
        self.device = next(model.parameters()).device
        self.sampler, self.end_kwargs = self._sampler(model, eos_id)
        self.row_kwargs = self._row_kwargs(eos_id)
        self.pass_overhead: float | None = None   # measured at the first step (`_pass`); None: one pass
        self.overhead_measured = False

    @staticmethod
    def _sampler(model, eos_id: int | None):
        """The model family's sampler and how it ends a row's text at EOS, so a row stops costing
        anything once its text has ended: LLaDA decodes EOS last and stops the row there; a
        block-diffusion model stops once its text before the EOS is decoded (eos_early_stop)."""
        if is_block_diffusion(model):
            eos_id = special_ids(model, "eos_token_id", eos_id)
            return block_generate, dict(eos_id=eos_id, eos_early_stop=eos_id is not None)
        return generate, dict(eos_token_id=eos_id, eos_last=eos_id is not None, stop_at_eos=eos_id is not None)

    def steps(self, job: Job) -> bool:
        """Whether `job` runs as a row that joins the running steps (else in a whole-call group; a
        tensor-parallel server's wrapped sampler always runs whole calls)."""
        if self.sampler is generate:
            return steppable(job.options)
        return self.sampler is block_generate and block_steppable(self.model, job.options)

    def advance(self, running: list[Running], admitted: list[Job]) -> list[Running]:
        """Start the admitted rows, run one step of every live row, post what each committed;
        returns the rows still running."""
        for job in admitted:
            try:
                running.append(self._start(job))
            except Exception as e:   # checked before it was queued; if it fails anyway, it fails alone
                log.exception("request %d could not start", job.id)
                job.post(Failed(e))
        now = time.monotonic()
        live = [r for r in running if not r.job.abandoned(now)]
        if live:
            started = time.monotonic()
            self._step(live)
            tokens = 0
            for r in live:
                if not r.job.done:
                    self._post_row(r)
                    tokens += r.text.ending.completion_tokens if r.text.ending else 0
            if self.metrics is not None:
                self.metrics.record_step(len(live), time.monotonic() - started, tokens)
        return [r for r in live if not r.job.done]

    def _start(self, job: Job) -> Running:
        # what the sampler checks at every call (the request was checked before it was queued; a row
        # that reaches here unchecked fails alone, as a whole call's retry makes it fail alone)
        masked = {"prompt_masked": self.mask_id in job.prompt} if isinstance(job.options, SamplerOptions) else {}
        job.options.check_for_model(self.model, len(job.prompt), self.mask_id, **masked)
        generator = torch.Generator(self.device).manual_seed(job.seed) if job.seed is not None else None
        if self.sampler is block_generate:
            row = BlockRow.start(job.prompt, job.options, model=self.model, mask_id=self.mask_id, generator=generator,
                                 device=self.device, **self.end_kwargs)
        else:
            row = Row.start(job.prompt, job.options, mask_id=self.mask_id, generator=generator, device=self.device,
                            **self.row_kwargs)
        view = _CanvasView(job.options, self.mask_id) if job.progress else None
        return Running(job, row, RowText(self.tokenizer, self.mask_id, self.end_ids, job.stop), view)

    def _row_kwargs(self, eos_id: int | None) -> dict:
        """How a stepped row ends its text, as `generate` with `end_kwargs` does (EOS/EOT ids
        resolved from the model config as `generate` resolves them)."""
        return dict(eos_token_id=special_ids(self.model, "eos_token_id", eos_id),
                    eot_token_id=special_ids(self.model, "eot_token_id", None),
                    eos_last=eos_id is not None, stop_at_eos=eos_id is not None)

    def _step(self, live: list[Running]) -> None:
        """One step of the live rows: one pass per LoRA adapter among them (the adapter is the
        model's, active for the whole pass), a single pass without adapters."""
        by_adapter: dict[str | None, list[Running]] = {}
        for r in live:
            by_adapter.setdefault(r.job.adapter, []).append(r)
        for adapter, rows in by_adapter.items():
            if self.adapters is not None:
                self.adapters.activate(adapter)
            self._pass(rows)

    def _pass(self, live: list[Running]) -> None:
        """One step of rows that share a pass (or a few passes, when their canvas lengths differ so
        much that the padding would cost more than another pass: `sampling.rows.pass_groups`, with
        the pass overhead measured on this model at the first step); if it fails, the rows it did
        not advance are stepped one by one, so only a row that cannot run fails."""
        if not self.overhead_measured:
            self.overhead_measured = True
            try:
                self.pass_overhead = measure_pass_overhead(self.model, self.pad_id)
                log.info("a forward pass costs about %.0f canvas tokens beyond its rows' own", self.pass_overhead)
            except Exception:   # a model that cannot run the timing batch still serves, in one pass a step
                log.exception("could not time a forward pass; every step's rows share one pass")
        step_rows = block_step if self.sampler is block_generate else step
        before = [r.row.step_index for r in live]
        try:
            step_rows(self.model, [r.row for r in live], self.pad_id, self.pass_overhead)
        except Exception as e:
            log.warning("a step of %d rows failed (%s: %s); stepping them one by one", len(live), type(e).__name__, e)
            for r, n in zip(live, before):
                if r.row.step_index == n and not r.row.done:
                    try:
                        step_rows(self.model, [r.row], self.pad_id)
                    except Exception as alone:
                        log.exception("request %d failed", r.job.id)
                        r.job.post(Failed(alone))

    def _post_row(self, r: Running) -> None:
        gen, last = r.row.gen.tolist(), r.row.last
        progress = None
        if r.view is not None and last is not None:
            progress = r.view.step(last.step, last.block, gen, last.committed, last.confidence, self.piece)
        self._post(r.job, r.text, gen, progress, final=r.row.done)

    def run(self, jobs: list[Job]) -> None:
        """Generate `jobs` as one batch. Each request was checked before it was queued, but if the
        batch fails anyway, the requests that have not been sent anything yet are retried one by
        one, so a request that cannot run fails alone; the others (a retry would resend their
        text) fail with the batch's error."""
        try:
            self._generate(jobs)
        except Exception as e:  # one bad request must fail neither its batch-mates nor the server
            retry = [j for j in jobs if not j.done and not j.posted] if len(jobs) > 1 else []
            if retry:
                log.warning("batch of %d failed (%s: %s); retrying %d of its requests one by one",
                            len(jobs), type(e).__name__, e, len(retry))
            else:
                log.exception("batch of %d failed", len(jobs))
            for job in jobs:
                if not job.done and job not in retry:
                    job.post(Failed(e))
            for job in retry:
                self.run([job])

    def _generate(self, jobs: list[Job]) -> None:
        started = time.monotonic()
        options = jobs[0].options
        if self.adapters is not None:   # every row of a whole call asks for the same adapter (Job.key)
            self.adapters.activate(jobs[0].adapter)
        rows = [RowText(self.tokenizer, self.mask_id, self.end_ids, j.stop) for j in jobs]
        views = [_CanvasView(options, self.mask_id) if j.progress else None for j in jobs]
        ids, attention = self._canvas(jobs, options)
        seed = jobs[0].seed if len(jobs) == 1 else None
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None

        def on_step(state: StepState) -> None:
            n, start = len(jobs), state.prompt_length   # rows past n pad a graphed batch: ignored
            gen = state.x[:n, start:].tolist()
            committed = state.committed[:n, start:]
            confidence = state.confidence[:n, start:]
            now = time.monotonic()
            for r, job in enumerate(jobs):
                if job.abandoned(now):
                    continue
                progress = (views[r].step(state.step, state.block, gen[r], committed[r], confidence[r], self.piece)
                            if views[r] else None)
                self._post(job, rows[r], gen[r], progress)
            if all(j.done for j in jobs):
                raise _BatchDone

        try:
            x = self.sampler(self.model, ids.to(self.device), **options.kwargs(), **self.end_kwargs,
                             mask_id=self.mask_id, attention_mask=attention.to(self.device), generator=generator,
                             callback=on_step)
            for r, job in enumerate(jobs):   # rows whose text ran to the last position
                if not job.done:
                    self._post(job, rows[r], x[r, ids.shape[1]:].tolist(), None, final=True)
        except _BatchDone:
            pass
        finally:
            tokens = sum(r.ending.completion_tokens for r in rows if r.ending)
            self.metrics.record_batch(len(jobs), time.monotonic() - started, tokens)

    def _canvas(self, jobs: list[Job], options) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's left-padded prompts and attention mask; a graphed batch padded to a fixed
        shape (`FixedShapes.pad`), within the context left after the generated part."""
        prompts = [j.prompt for j in jobs]
        if self.shapes is None or not getattr(options, "cuda_graph", False):
            return left_pad(prompts, self.pad_id)
        context = context_length(self.model)
        return self.shapes.pad(prompts, self.pad_id, None if context is None else context - options.gen_length)

    @staticmethod
    def _post(job: Job, row: RowText, gen: list[int], progress: dict | None, final: bool = False) -> None:
        text = row.update(gen, final=final)
        if row.ending is not None:
            job.post(Finished(text, row.ending, progress))
        elif (text and job.stream) or progress:
            job.post(Update(text, progress))


class _CanvasView:
    """One row's canvas for the live view: token texts (None = masked) and the confidence each had
    when it was committed, so a client can colour tokens without replaying the whole history.

    `steps` is the total for LLaDA; None for a block-diffusion model, whose blocks end as soon as
    their threshold has committed everything (or the text has ended), so no total is known ahead."""

    def __init__(self, options: SamplerOptions | BlockOptions, mask_id: int):
        self.steps = options.steps if isinstance(options, SamplerOptions) else None
        self.mask_id = mask_id
        self.commit_confidence: list[float | None] = [None] * options.gen_length

    def step(self, step: int, block: int, gen: list[int], committed: torch.Tensor, confidence: torch.Tensor,
             piece) -> dict:
        newly = committed.nonzero().flatten().tolist()
        for i, c in zip(newly, confidence[newly].tolist()):
            self.commit_confidence[i] = None if c != c else round(min(max(c, 0.0), 1.0), 4)   # c != c: nan
        return {
            "step": step, "block": block, "steps": self.steps, "committed": newly,
            "tokens": [None if t == self.mask_id else piece(t) for t in gen],
            "confidence": list(self.commit_confidence),
        }


class Scheduler:
    """The bounded queue and the loop that admits rows at every step; lives on the event loop."""

    def __init__(self, runner: BatchRunner, *, max_batch_size: int, max_queue: int, window_s: float,
                 max_batch_tokens: int | None = None):
        self.runner = runner
        self.max_batch_size, self.max_queue, self.window_s = max_batch_size, max_queue, window_s
        self.max_batch_tokens = max_batch_tokens   # None: rows alone bound a step
        self.pending: list[Job] = []
        self.rows: list[Running] = []    # stepped rows
        self.group: list[Job] = []       # the whole-call group running, if any
        self.joining: list[Job] = []     # admitted at the step that is running (not rows yet)
        self.accepting = True            # False once draining or closing: submit refuses new work
        self.closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unmask-generate")
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> list[Job]:
        return [r.job for r in self.rows] + self.joining + self.group

    @property
    def queue_depth(self) -> int:
        return len(self.pending)

    @property
    def in_flight(self) -> int:
        return sum(not j.done for j in self.running)

    @property
    def busy(self) -> bool:
        """Whether any accepted request is still waiting or being generated."""
        return bool(self.pending) or self.in_flight > 0

    def snapshot(self) -> list[dict]:
        """The running rows for the live page: which step each is at."""
        now = time.monotonic()
        out = []
        for r in self.rows:
            o = r.job.options
            if not r.job.done:
                out.append({"id": r.job.id, "step": r.row.step_index, "steps": r.row.total_steps,
                            "block": r.row.block_number, "blocks": r.row.blocks,
                            "max_tokens": o.gen_length, "cfg_scale": o.cfg_scale, "temperature": o.temperature,
                            "seconds": round(now - r.started, 3)})
        out += [{"id": j.id, "step": None, "steps": None, "max_tokens": j.options.gen_length,
                 "cfg_scale": j.options.cfg_scale, "temperature": j.options.temperature, "whole_call": True}
                for j in self.group if not j.done]
        return out

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, job: Job) -> None:
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
        self.pending.append(job)
        self._wakeup.set()

    def stop_accepting(self) -> None:
        """Refuse new work; what was accepted still runs (the first step of a graceful shutdown)."""
        self.accepting = False

    async def close(self) -> None:
        """Refuse new work, end every accepted request with ShuttingDown (so each client gets an
        answer), stop the running rows, and wait for the worker. Safe to call twice."""
        self.accepting, self.closing = False, True
        for job in self.pending + self.running:
            if not job.done:   # posted before cancelling: the worker drops cancelled rows silently
                job.post(Failed(ShuttingDown("the server is shutting down")))
            job.cancelled = True
        self.pending.clear()
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.closing:
            self._drop_dead()
            self.rows = [r for r in self.rows if not r.job.done]
            if not self.rows and not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self.rows and self.window_s:
                await self._gather()
            if not self.rows and self.pending and not self.runner.steps(self.pending[0]):
                await self._run_group(loop)
                continue
            self.joining = self._admit()
            if not self.rows and not self.joining:
                continue
            try:
                self.rows = await loop.run_in_executor(self._executor, self.runner.advance, list(self.rows),
                                                       self.joining)
            except Exception as e:  # the runner catches its own errors; this is the last guard
                log.exception("scheduler: step failed")
                for job in self.running:
                    if not job.done:
                        job.post(Failed(e))
                self.rows = []
            finally:
                self.joining = []

    async def _gather(self) -> None:
        """Idle, before the first step: wait a window for companions; before a whole-call group,
        another while they keep arriving (at most GATHER_WINDOWS in all), until a full batch
        waits. Clients that were answered together send their next requests together but not at
        the same instant; one fixed window split them into a lone request and the rest, which for
        a whole-call group (hundreds of steps, no joining) halved the batch under a steady load
        (measured: concurrency 8 ran groups of 1 and 7, on a GPU 0.58 of the batch-8 throughput).
        Stepped rows wait one window only: a late companion joins at the next step anyway."""
        windows = 1 if self.runner.steps(self.pending[0]) else GATHER_WINDOWS
        for _ in range(windows):
            waiting = len(self.pending)
            if waiting >= self.max_batch_size:
                break
            await asyncio.sleep(self.window_s)
            self._drop_dead()
            if len(self.pending) <= waiting:
                break

    def _admit(self) -> list[Job]:
        """Waiting jobs that join at this step, oldest first, while the rows and their canvas tokens
        fit; the first that does not fit waits (no overtaking), as does a whole-call job, which
        waits for the running rows to finish."""
        rows = len(self.rows)
        tokens = sum(r.job.tokens for r in self.rows)
        admitted = []
        for job in self.pending:
            if rows >= self.max_batch_size or not self.runner.steps(job):
                break
            if self.max_batch_tokens is not None and tokens + job.tokens > self.max_batch_tokens and rows:
                break
            admitted.append(job)
            rows, tokens = rows + 1, tokens + job.tokens
        return self._take(admitted)

    def _take(self, jobs: list[Job]) -> list[Job]:
        """Remove `jobs` from the waiting queue, the others keeping their order; returns `jobs`."""
        chosen = set(map(id, jobs))
        self.pending = [j for j in self.pending if id(j) not in chosen]
        return jobs

    async def _run_group(self, loop) -> None:
        """A whole-call group: the head job and the waiting jobs of equal options, as one sampler call."""
        key = self.pending[0].key
        self.group = self._take([j for j in self.pending if j.key == key][: self.max_batch_size])
        try:
            await loop.run_in_executor(self._executor, self.runner.run, self.group)
        except Exception as e:  # the runner catches its own errors; this is the last guard
            log.exception("scheduler: batch failed")
            for job in self.group:
                if not job.done:
                    job.post(Failed(e))
        finally:
            self.group = []

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
