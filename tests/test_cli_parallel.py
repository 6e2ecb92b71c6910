"""`unmask chat --tp` and `unmask bench --tp` under torchrun, against one process."""

import io
import os
import subprocess
import sys

import pytest

from unmask.cli import main

CHAT = "Who is Ada?\nWhere does she live?\n"


def _torchrun(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "unmask",
                           *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint, parallel", [("tiny_checkpoint", ["--tp", "2"]),
                                                  ("tiny_llada2_checkpoint", ["--tp", "2", "--ep", "2"])])
def test_torchrun_chat_with_tp_replies_as_one_process(checkpoint, parallel, request, monkeypatch, capsys):
    """Two scripted turns: rank 0 reads them and sends each to rank 1; the transcript on stdout is
    the one-process transcript (LLaDA dense at TP 2; the LLaDA2 layout with its experts split whole)."""
    args = ["chat", "--model", str(request.getfixturevalue(checkpoint)), "--gen-length", "16", "--cfg-scale", "1"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT))
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert expected.count("model> ") == 2
    run = _torchrun([*args, *parallel], stdin=CHAT)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
