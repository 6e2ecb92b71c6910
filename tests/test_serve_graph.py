"""The server on the CUDA-graph path (issue 13, item 3): graphed batches padded to fixed shapes, and
`unmask loadtest` at several concurrencies.

On a CPU the graph runner's static-buffer path runs without capture (sampling/cuda_graph.py), so
these tests cover everything the server does for graphs except the capture itself: the padding,
the shapes a stream of requests meets, and that no row's text changes.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import pytest

import unmask
from serve_fixtures import live_server
from unmask.cli import main as cli_main
from unmask.sampling import SamplerOptions
from unmask.serve import ServeConfig, create_app
from unmask.serve.batching import BatchRunner, Finished, FixedShapes, Job
from unmask.serve.loadtest import LoadTest, format_levels, run_levels
from unmask.serve.metrics import ServerMetrics

MODEL = "tiny"
EAGER = SamplerOptions(steps=16, gen_length=16, block_length=8, cache="dual")
GRAPHED = SamplerOptions(steps=16, gen_length=16, block_length=8, cache="dual", cuda_graph=True)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return unmask.load(tiny_checkpoint)


def recording(runner: BatchRunner) -> list[tuple[int, int]]:
    """Record the (rows, prompt width) of every sampler call the runner makes."""
    shapes, sampler = [], runner.sampler

    def sample(model, ids, **kw):
        shapes.append(tuple(ids.shape))
        return sampler(model, ids, **kw)

    runner.sampler = sample
    return shapes


def run_jobs(runner: BatchRunner, prompts: list[list[int]], options) -> list[tuple]:
    """Run the prompts as one batch; (text, finish_reason, completion_tokens) per prompt."""
    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [Job(prompt=p, options=options, loop=loop, deadline=time.monotonic() + 600) for p in prompts]
        runner.run(jobs)
        await asyncio.sleep(0)   # deliver the events posted with call_soon_threadsafe
        events = [[job.events.get_nowait() for _ in range(job.events.qsize())] for job in jobs]
        assert all(isinstance(e[-1], Finished) for e in events), events
        return [(e[-1].ending.text, e[-1].ending.finish_reason, e[-1].ending.completion_tokens) for e in events]
    return asyncio.run(scenario())


def test_fixed_shapes_ladder():
    shapes = FixedShapes(max_rows=16)
    assert [shapes.rows(n) for n in range(1, 17)] == [1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8
    assert [FixedShapes(max_rows=12).rows(n) for n in (5, 8, 9, 12)] == [8, 8, 12, 12]   # the cap is a size too
    assert [shapes.width(n) for n in (1, 31, 32, 33, 64, 65, 300)] == [32, 32, 32, 64, 64, 128, 512]
    assert shapes.width(65, limit=100) == 100 and shapes.width(120, limit=100) == 120   # never past the context
    assert FixedShapes(max_rows=8, min_width=16).width(3) == 16


def test_graphed_batch_is_padded_and_each_row_equals_its_request_alone(loaded):
    """Five prompts of 3..40 tokens: padded to 8 rows (three copies of the first, dropped) and 64
    columns; each row's text is what its request gives alone, graphed or eager, and what the
    unpadded eager batch gives."""
    model, tokenizer = loaded
    g = random.Random(0)
    prompts = [[g.randrange(256) for _ in range(n)] for n in (3, 17, 9, 40, 25)]

    def runner():
        return BatchRunner(model, tokenizer, mask_id=383, pad_id=381, eos_id=381, end_ids={380, 381},
                           metrics=ServerMetrics(lambda: 0, lambda: 0), shapes=FixedShapes(max_rows=16))

    graphed, eager = runner(), runner()
    graphed_shapes, eager_shapes = recording(graphed), recording(eager)
    batched = run_jobs(graphed, prompts, GRAPHED)
    assert graphed_shapes == [(8, 64)]
    assert batched == run_jobs(eager, prompts, EAGER) and eager_shapes == [(5, 40)]   # eager batches: no padding
    assert batched == [run_jobs(eager, [p], EAGER)[0] for p in prompts]
    assert batched == [run_jobs(graphed, [p], GRAPHED)[0] for p in prompts]
    assert graphed_shapes[1:] == [(1, 32), (1, 32), (1, 32), (1, 64), (1, 32)]
    assert len(set(batched)) == len(prompts)   # every row its own text: a mix-up of rows would show


def test_a_stream_of_requests_meets_few_shapes_and_keeps_every_text(loaded):
    """30 requests with random prompt lengths, sent by bursts of random concurrency to a server
    with cuda_graph (on the CPU: the graph path without capture): every answer equals the same
    request sent alone, and the batches take no shape outside the ladder (rows 1, 2, 4, 8) x the
    widths (32, 64, 128)."""
    config = ServeConfig(model_name=MODEL, cuda_graph=True, max_batch_size=8, default_max_tokens=16,
                         batch_window_ms=30)
    app = create_app(*loaded, config)
    shapes = recording(app.state.server.runner)
    g = random.Random(1)
    prompts = ["why " * g.randrange(1, 25) for _ in range(30)]

    def ask(base, prompt):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16}
        r = httpx.post(base + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with live_server(app) as base:
        alone = [ask(base, p) for p in prompts]
        answers, i = {}, 0
        while i < len(prompts):
            burst = range(i, min(i + g.randrange(1, 9), len(prompts)))
            threads = [threading.Thread(target=lambda k=k: answers.update({k: ask(base, prompts[k])})) for k in burst]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            i = burst.stop
    assert [answers[k] for k in range(len(prompts))] == alone
    seen = set(shapes)
    assert seen <= {(rows, width) for rows in (1, 2, 4, 8) for width in (32, 64, 128)}, seen
    assert any(rows > 1 for rows, _ in seen), "no burst ever shared a batch"


def test_cuda_graph_defaults_to_the_dual_cache_and_names_its_flag():
    config = ServeConfig(cuda_graph=True)
    assert config.options(32).cache == "dual" and config.options(32).cuda_graph
    prefix = config.options(32, cache="prefix")   # a request may still pick the prefix cache: run eagerly
    assert prefix.cache == "prefix" and not prefix.cuda_graph
    assert ServeConfig(cache="prefix").options(32).cache == "prefix" and ServeConfig().options(32).cache is None
    for config, block_diffusion, device, flag in [
            (ServeConfig(cuda_graph=True), False, "cpu", "--cuda-graph"),      # SamplerOptions.check(device=...)
            (ServeConfig(cuda_graph=True, cache="prefix"), False, None, "--cuda-graph"),
            (ServeConfig(cuda_graph=True), True, None, "--cuda-graph"),        # LLaDA2.x: not its option
            (ServeConfig(cache="dual"), True, None, "--cache")]:
        with pytest.raises(ValueError, match=f"^{flag}: "):
            config.check(block_diffusion, device)
    ServeConfig(cuda_graph=True).check(device=None)   # the library runs the graph path off CUDA (tests do)


def test_serve_refuses_cuda_graph_off_cuda_before_the_model_loads(capsys):
    rc = cli_main(["serve", "--model", "/nonexistent/checkpoint", "--device", "cpu", "--cuda-graph"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("unmask serve: error: --cuda-graph: ") and "nonexistent" not in err, err


def test_loadtest_reports_one_row_per_concurrency(loaded, capsys):
    with live_server(create_app(*loaded, ServeConfig(model_name=MODEL, max_batch_size=4))) as base:
        reports = run_levels(LoadTest(url=base, requests=4, max_tokens=8, warmup=2), [1, 3])
        rc = cli_main(["loadtest", "--url", base, "--concurrency", "1", "2", "--requests", "2", "--max-tokens", "8"])
    assert [(r.concurrency, r.sent, r.ok, r.errors) for r in reports] == [(1, 4, 4, 0), (3, 4, 4, 0)]
    assert all(0 < r.completion_tokens <= 32 for r in reports)
    table = format_levels(reports).splitlines()
    assert len(table) == 4 and table[0].startswith("| concurrency | ok | errors | req/s | completion tokens/s")
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == table[0] and [line.split(" | ")[0] for line in out[2:]] == ["| 1", "| 2"]
    with pytest.raises(ValueError, match="--concurrency"):
        run_levels(LoadTest(url=base, requests=2), [1, 3])


def test_the_batching_layer_loads_without_the_web_stack():
    """A GPU machine with PyTorch but no FastAPI runs scripts/gpu_checks.py, which needs only
    unmask.serve.batching; the app still loads lazily where FastAPI is installed."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "from unmask.serve.batching import FixedShapes\n"
            "import unmask.serve\n"
            "try:\n    unmask.serve.create_app\nexcept ImportError:\n    print('lazy')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"
    assert create_app.__module__ == "unmask.serve.app"
