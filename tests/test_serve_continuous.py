"""Continuous batching in the server: requests join the running rows at the next step with their
own settings, leave at once when cancelled, and each text equals its request run alone."""

import asyncio
import threading
import time

import httpx
import pytest
import torch

import unmask
from serve_fixtures import live_server
from unmask.sampling import SamplerOptions
from unmask.sampling.options import BlockOptions
from unmask.serve import ServeConfig, create_app
from unmask.serve.batching import BatchRunner, Failed, Finished, Job, Scheduler
from unmask.serve.metrics import ServerMetrics
from unmask.serve.textstream import RowText

MASK, EOS, EOT = 383, 381, 380
LONG = SamplerOptions(steps=48, gen_length=48, block_length=16, cfg_scale=1.0)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return unmask.load(tiny_checkpoint)


def runner_for(loaded) -> BatchRunner:
    model, tokenizer = loaded
    return BatchRunner(model, tokenizer, mask_id=MASK, pad_id=EOS, eos_id=EOS, end_ids={EOT, EOS},
                       metrics=ServerMetrics(lambda: 0, lambda: 0))


def alone_text(loaded, prompt, options, seed=None) -> str:
    """The request run alone through the library, as the server ends its text."""
    model, tokenizer = loaded
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = unmask.generate(model, torch.tensor([prompt]), **options.kwargs(), mask_id=MASK, generator=generator,
                        eos_token_id=EOS, eos_last=True, stop_at_eos=True)
    return RowText(tokenizer, MASK, {EOT, EOS}, []).update(x[0, len(prompt):].tolist(), final=True) or ""


async def until(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        await asyncio.sleep(0.005)


def scenario(loaded, body, scheduler_cls=Scheduler, **scheduler_kw):
    async def run():
        scheduler = scheduler_cls(runner_for(loaded), max_queue=16, window_s=0.0,
                                  **{"max_batch_size": 8, **scheduler_kw})
        scheduler.start()
        loop = asyncio.get_running_loop()

        def job(prompt, options, seed=None):
            return Job(prompt=prompt, options=options, loop=loop, deadline=time.monotonic() + 120, seed=seed)

        try:
            return await body(scheduler, job)
        finally:
            await scheduler.close()

    return asyncio.run(run())


def test_a_later_request_with_other_settings_joins_the_running_rows(loaded):
    """A short request sent while a long one runs, with other max_tokens, temperature, seed and
    cfg_scale, starts at the next step and finishes first; both texts equal their requests alone."""
    tokenizer = loaded[1]
    long_prompt = tokenizer("Where does Mira live?").input_ids
    short_prompt = tokenizer("Tom").input_ids
    short = SamplerOptions(steps=8, gen_length=16, block_length=8, temperature=0.7)

    async def body(scheduler, job):
        a = job(long_prompt, LONG)
        scheduler.submit(a)
        await until(lambda: scheduler.rows and scheduler.rows[0].row.step_index >= 3)
        b = job(short_prompt, short, seed=7)
        scheduler.submit(b)
        done_b = await asyncio.wait_for(b.events.get(), 60)
        a_running = not a.done
        done_a = await asyncio.wait_for(a.events.get(), 60)
        return a_running, done_a, done_b

    a_running, done_a, done_b = scenario(loaded, body)
    assert isinstance(done_a, Finished) and isinstance(done_b, Finished)
    assert a_running, "the short request waited for the long one"
    assert done_a.ending.text == alone_text(loaded, long_prompt, LONG)
    assert done_b.ending.text == alone_text(loaded, short_prompt, short, seed=7)


@pytest.mark.parametrize("timing", ["measured", "fails"])
def test_the_runner_times_a_pass_once_and_serves_either_way(loaded, monkeypatch, timing):
    """The first step measures the pass overhead (which splits rows of very different lengths into
    passes); if the timing cannot run, rows share one pass. Texts equal their requests alone."""
    import unmask.serve.batching as batching

    calls = []

    def timed(model, pad_id):
        calls.append(pad_id)
        if timing == "fails":
            raise RuntimeError("no timing here")
        return 0.0   # every width its own pass

    monkeypatch.setattr(batching, "measure_pass_overhead", timed)
    tokenizer = loaded[1]
    prompts = [tokenizer("Mira").input_ids, tokenizer("Where does Mira live? Tell me more.").input_ids]
    options = [SamplerOptions(steps=8, gen_length=8, block_length=8), LONG]

    async def body(scheduler, job):
        jobs = [job(p, o) for p, o in zip(prompts, options)]
        for j in jobs:
            scheduler.submit(j)
        events = [await asyncio.wait_for(j.events.get(), 60) for j in jobs]
        return events, scheduler.runner.pass_overhead

    events, overhead = scenario(loaded, body)
    assert calls == [EOS]
    assert overhead == (0.0 if timing == "measured" else None)
    for event, prompt, o in zip(events, prompts, options):
        assert isinstance(event, Finished) and event.ending.text == alone_text(loaded, prompt, o)


def test_llada2_requests_join_the_running_rows_too(tiny_llada2_checkpoint):
    """Block diffusion (LLaDA2.x) is stepped per row as well (`sampling.block_rows`): a request with
    other max_tokens, block length, threshold and cfg_scale joins a running one at the next step,
    the live view shows both rows' blocks, and each text equals its request alone."""
    loaded = unmask.load(tiny_llada2_checkpoint)
    model, tokenizer = loaded
    long = BlockOptions(gen_length=64, block_length=8, steps=8, threshold=None, cfg_scale=1.0).check()
    short = BlockOptions(gen_length=16, block_length=4, steps=2, threshold=0.05).check()
    prompts = [tokenizer("Where does Mira live?").input_ids, tokenizer("Mira").input_ids]

    async def body(scheduler, job):
        a = job(prompts[0], long)
        scheduler.submit(a)
        await until(lambda: scheduler.rows and scheduler.rows[0].row.step_index >= 3)
        b = job(prompts[1], short)
        scheduler.submit(b)
        await until(lambda: len(scheduler.rows) == 2)
        view = scheduler.snapshot()
        done_b = await asyncio.wait_for(b.events.get(), 60)
        a_running = not a.done
        return view, a_running, done_b, await asyncio.wait_for(a.events.get(), 60)

    view, a_running, done_b, done_a = scenario(loaded, body)
    assert a_running, "the short request waited for the long one"
    # blocks on each row's own grid: the 21-token prompt ends in block 2 of 8 tokens, its text in block 10
    assert [(v["blocks"], v["steps"]) for v in view] == [(9, None), (4, None)] and view[0]["block"] >= 1
    for event, prompt, options in ((done_a, prompts[0], long), (done_b, prompts[1], short)):
        x = unmask.block_generate(model, torch.tensor([prompt]), **options.kwargs(), mask_id=MASK, eos_id=EOS,
                                  eos_early_stop=True)
        expected = RowText(tokenizer, MASK, {EOT, EOS}, []).update(x[0, len(prompt):].tolist(), final=True) or ""
        assert isinstance(event, Finished) and event.ending.text == expected


def test_the_equal_options_policy_waits_for_the_running_rows(loaded):
    """The policy before continuous batching, which scripts/continuous_vs_static.py measures
    against: a request with other settings starts only once the running rows are done."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from continuous_vs_static import EqualOptionsScheduler

    tokenizer = loaded[1]
    short = SamplerOptions(steps=8, gen_length=16, block_length=8)

    async def body(scheduler, job):
        a, b = job(tokenizer("Mira").input_ids, LONG), job(tokenizer("Tom").input_ids, short)
        scheduler.submit(a)
        await until(lambda: scheduler.rows and scheduler.rows[0].row.step_index >= 3)
        scheduler.submit(b)
        either = [asyncio.ensure_future(a.events.get()), asyncio.ensure_future(b.events.get())]
        await asyncio.wait_for(asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED), 60)
        return a.done, b.done

    a_done, b_done = scenario(loaded, body, EqualOptionsScheduler)
    assert a_done and not b_done


def test_a_cancelled_row_frees_its_place_at_the_next_step(loaded):
    """With room for one row, cancelling the running request starts the waiting one at once."""
    tokenizer = loaded[1]

    async def body(scheduler, job):
        a, b = job(tokenizer("Mira").input_ids, LONG), job(tokenizer("Tom").input_ids, LONG)
        scheduler.submit(a)
        scheduler.submit(b)
        await until(lambda: scheduler.rows and scheduler.rows[0].row.step_index >= 2)
        a_step = scheduler.rows[0].row.step_index
        a.cancelled = True
        await until(lambda: any(r.job is b for r in scheduler.rows))
        rows = [r.job for r in scheduler.rows]
        return a_step, rows, await asyncio.wait_for(b.events.get(), 60)

    a_step, rows, b_event = scenario(loaded, body, max_batch_size=1)
    assert a_step < LONG.steps and rows == [rows[0]] and isinstance(b_event, Finished)


def test_the_token_budget_holds_a_request_until_rows_finish(loaded):
    """Two rows would exceed --max-batch-tokens: the second waits; alone, a row over the budget
    still runs (it would otherwise never start)."""
    tokenizer = loaded[1]
    prompt = tokenizer("Mira").input_ids
    one_row = (len(prompt) + LONG.gen_length) * 2   # a guided row: its canvas and its unconditional twin

    async def body(scheduler, job):
        a, b = job(prompt, LONG), job(prompt, LONG)
        scheduler.submit(a)
        scheduler.submit(b)
        await until(lambda: scheduler.rows and scheduler.rows[0].row.step_index >= 2)
        waiting = list(scheduler.pending)
        await asyncio.wait_for(a.events.get(), 60)
        return waiting, await asyncio.wait_for(b.events.get(), 60)

    waiting, b_event = scenario(loaded, body, max_batch_tokens=one_row - 1)
    assert len(waiting) == 1 and isinstance(b_event, Finished)
    waiting, _ = scenario(loaded, body, max_batch_tokens=one_row * 2)   # both fit: nothing waits
    assert waiting == []


@pytest.mark.parametrize("options, joins", [
    (SamplerOptions(steps=16, gen_length=16, block_length=8, cache="dual", cfg_scale=1.0, reuse_uncond=True), True),
    (SamplerOptions(steps=16, gen_length=16, block_length=8, compile="eager"), False),
])
def test_a_cached_request_joins_the_rows_and_a_compiled_one_waits_for_them(loaded, options, joins):
    """A dual-cache request (with reuse_uncond) joins the running rows at the next step with its own
    cache (`sampling.rows.cached_pass`); a compiled call is fixed for a whole call, so it waits for
    the running rows and then runs as one sampler call. Either equals its request alone."""
    tokenizer = loaded[1]
    prompt = tokenizer("Tom").input_ids

    async def body(scheduler, job):
        a, b = job(tokenizer("Mira").input_ids, LONG), job(prompt, options)
        scheduler.submit(a)
        await until(lambda: scheduler.rows and scheduler.rows[0].row.step_index >= 2)
        scheduler.submit(b)
        b_event = await asyncio.wait_for(b.events.get(), 60)
        a_done = a.done
        return a_done, b_event, await asyncio.wait_for(a.events.get(), 60)

    a_done, b_event, a_event = scenario(loaded, body)
    assert a_done != joins
    assert isinstance(a_event, Finished) and b_event.ending.text == alone_text(loaded, prompt, options)


def test_a_row_that_cannot_start_fails_alone(loaded):
    tokenizer = loaded[1]
    options = SamplerOptions(steps=8, gen_length=8, block_length=8)

    async def body(scheduler, job):
        bad = job(tokenizer("Tom").input_ids, options)
        bad.prompt = "not token ids"
        good = job(tokenizer("Mira").input_ids, options)
        scheduler.submit(bad)
        scheduler.submit(good)
        return [await asyncio.wait_for(j.events.get(), 60) for j in (bad, good)]

    bad, good = scenario(loaded, body)
    assert isinstance(bad, Failed) and isinstance(good, Finished)


def test_live_rows_endpoint_shows_each_rows_step(loaded):
    """GET /rows (polled by the live page) lists the running rows and the step each is at."""
    model, tokenizer = loaded
    config = ServeConfig(model_name="tiny", max_tokens_limit=480, max_batch_size=4)
    body = {"model": "tiny", "prompt": "Mira", "max_tokens": 48, "steps": 48, "block_length": 16, "cfg_scale": 1.0}
    with live_server(create_app(model, tokenizer, config)) as base:
        assert httpx.get(base + "/rows").json() == {"rows": [], "queued": 0}
        thread = threading.Thread(target=httpx.post, args=(base + "/v1/completions",), kwargs={"json": body,
                                                                                               "timeout": 60})
        thread.start()
        seen = []
        while thread.is_alive():
            seen += [r for r in httpx.get(base + "/rows").json()["rows"] if r["step"]]
        thread.join()
        page = httpx.get(base + "/").text
    assert seen and all(r["steps"] == 48 and r["max_tokens"] == 48 and r["blocks"] == 3 for r in seen)
    assert len({r["step"] for r in seen}) > 1
    assert "/rows" in page


def test_open_loop_loadtest_sends_a_trace_on_its_clock(loaded, tmp_path, capsys):
    """`unmask loadtest --open-loop`: a trace file's requests (each with its own settings) and the
    mixed preset, streamed; the report counts every request and its time to first text."""
    from unmask.cli import main as cli_main
    from unmask.serve.loadtest import LoadTest, mixed_trace, read_trace, run_open_loop

    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"prompt": "Mira", "max_tokens": 8, "temperature": 0.7, "seed": 1}\n\n'
                     '{"prompt": "Tom", "max_tokens": 16, "cfg_scale": 1.0, "at": 0.05}\n'
                     '{"prompt": "Ada", "max_tokens": 4, "cache": "dual", "cfg_scale": 1.0, "reuse_uncond": true}\n')
    entries = read_trace(trace, rate=20.0)
    at = {e["prompt"]: e["at"] for e in entries}
    assert at["Mira"] == 0.0 and at["Tom"] == 0.05 and at["Ada"] > 0   # Ada: a Poisson gap after Mira
    assert entries == sorted(entries, key=lambda e: e["at"])
    preset = mixed_trace(12, rate=10.0, seed=3)
    assert preset == mixed_trace(12, rate=10.0, seed=3) and len({(e["max_tokens"], e["cfg_scale"]) for e in preset}) > 1
    assert all(("seed" in e) == (e["temperature"] > 0) for e in preset)
    with live_server(create_app(*loaded, ServeConfig(model_name="tiny", max_tokens_limit=64))) as base:
        report = run_open_loop(LoadTest(url=base), entries)
        rc = cli_main(["loadtest", "--url", base, "--open-loop", "--preset", "mixed", "--rate", "20",
                       "--requests", "6"])
    assert (report.sent, report.ok, report.errors) == (3, 3, 0)
    assert 0 < report.completion_tokens <= 28 and len(report.latencies) == 3 and report.first_text
    out = capsys.readouterr().out
    assert rc == 0 and "requests: 6 sent, 6 ok, 0 errors" in out and "time to first text: p50" in out


@pytest.mark.parametrize("argv, message", [
    (["--open-loop"], "--trace FILE or --preset mixed"),
    (["--open-loop", "--preset", "mixed"], "--preset needs --rate"),
    (["--rate", "2", "--preset", "mixed"], "are for --open-loop"),
    (["--open-loop", "--preset", "mixed", "--rate", "0"], "--rate must be a positive number"),
])
def test_open_loop_flags_are_checked(argv, message):
    from unmask.commands.serve import _open_loop
    from unmask.cli import build_parser

    args = build_parser().parse_args(["loadtest", *argv])
    with pytest.raises(ValueError, match=message):
        _open_loop(args, None)


def test_a_bad_trace_line_names_its_line(tmp_path):
    from unmask.serve.loadtest import read_trace

    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt": "a"}\n{"prompt": "b", "max_token": 3}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: each line must be an object with a prompt"):
        read_trace(trace, rate=1.0)
    trace.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="give --rate"):
        read_trace(trace, rate=None)


def test_step_metrics_rate_counts_every_recent_step():
    """Rows finish at different steps: tokens/s divides the tokens finished by the time of all the
    recent steps, including those in which nothing finished."""
    m = ServerMetrics(lambda: 0, lambda: 0)
    m.record_step(3, 0.5, 0)
    assert m.last_tokens_per_second == 0.0
    m.record_step(2, 0.5, 10)
    assert m.last_tokens_per_second == 10.0
    text = m.render()
    assert "unmask_batches_total 2" in text and "unmask_generated_tokens_total 10" in text
