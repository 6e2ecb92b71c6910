"""`unmask serve --tp 2` under torchrun, against the one-process server, through the official openai client."""

import os
import re
import signal
import socket
import subprocess
import sys

import openai
import pytest

from serve_fixtures import wait_healthy
from unmask.cli import main as cli_main

# Each exercises a path of the leader/follower protocol: a stop string (rank 0 ends the batch early,
# the follower must stop at the same step), CFG, and a seeded draw (the generator's state is sent).
REQUESTS = [
    dict(prompt="Question: Where does Ada live?\nAnswer:", max_tokens=24, stop=["\n"]),
    dict(prompt="Who is Ada?", max_tokens=16, extra_body={"cfg_scale": 1.0}),
    dict(prompt="Ada lives in", max_tokens=16, temperature=0.8, seed=3),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], log) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*command, "--port", str(port), "--served-model-name", "tiny"], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"



def _texts(base: str) -> list[str]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    return [client.completions.create(model="tiny", **request).choices[0].text for request in REQUESTS]


@pytest.mark.slow
def test_serve_tp2_answers_as_one_process_and_every_rank_stops_on_sigterm(tiny_checkpoint, tmp_path):
    serve = ["-m", "unmask", "serve", "--model", str(tiny_checkpoint)]
    with open(tmp_path / "one.log", "w") as one_log, open(tmp_path / "tp.log", "w") as tp_log:
        one, one_url = _start([sys.executable, *serve], one_log)
        tp, tp_url = _start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *serve,
                             "--tp", "2"], tp_log)
        try:
            wait_healthy(one_url, one, timeout=180)
            wait_healthy(tp_url, tp, timeout=180)
            expected = _texts(one_url)
            assert _texts(tp_url) == expected
            leader = int(re.search(r"Started server process \[(\d+)\]", (tmp_path / "tp.log").read_text())[1])
            os.kill(leader, signal.SIGTERM)   # rank 0 drains, then ends the follower's service
            assert tp.wait(timeout=60) == 0, (tmp_path / "tp.log").read_text()
        finally:
            for proc in (one, tp):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
    log = (tmp_path / "tp.log").read_text()
    assert "Traceback" not in log, log
    assert "Application shutdown complete" in log


def test_serve_tp_errors_say_what_to_change(tiny_checkpoint, capsys):
    for tp, message in (("2", "torchrun --nproc-per-node 2 -m unmask"), ("3", "does not divide"),
                        ("0", "positive integer")):
        assert cli_main(["serve", "--model", str(tiny_checkpoint), "--device", "cpu", "--port", str(_free_port()),
                         "--tp", tp]) == 2
        assert message in capsys.readouterr().err
