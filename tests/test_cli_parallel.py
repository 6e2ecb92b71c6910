"""`unmask chat --tp` and `unmask bench --tp` under torchrun, against one process."""

import io
import json
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


@pytest.mark.slow
def test_torchrun_bench_with_tp_prints_one_table(tmp_path):
    """Rank 0 alone prints the table and writes the JSON; the exact mode agrees with the baseline
    (which gathers the sharded logits) on every token, at TP 2 with the experts split whole."""
    run = _torchrun(["bench", "--tp", "2", "--ep", "2", "--shape", "llada2-tiny", "--batch-sizes", "2",
                     "--prompt-len", "8", "--gen-length", "16", "--block-length", "8", "--repeats", "1",
                     "--modes", "block cache", "--json", str(tmp_path / "bench.json")])
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("unmask bench: random llada2-tiny") and "sharded over 2 ranks" in lines[0]
    assert [line.split(" | ")[1] for line in lines[3:]] == ["public algorithm, no cache (baseline)", "block cache"]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["meta"]["tp"] == 2 and [row["agreement"] for row in report["rows"]] == [1.0, 1.0]


def test_bench_tp_errors_say_what_to_change(capsys):
    """Before any weights are built (a bad --ep on random llada-moe-7b-a1b weights would take minutes)."""
    for args, message in ((["--shape", "tiny", "--tp", "2"], "torchrun --nproc-per-node 2"),
                          (["--shape", "tiny", "--tp", "3"], "does not divide"),
                          (["--shape", "tiny", "--tp", "2", "--ep", "2"], "has none"),
                          (["--shape", "llada2-tiny", "--tp", "2", "--quantize", "int8"], "--quantize"),
                          (["--shape", "llada-moe-7b-a1b", "--tp", "2", "--ep", "2", "--modes", "dual+graph"],
                           "captures CUDA graphs")):
        assert main(["bench", "--device", "cpu", *args]) == 2
        assert message in capsys.readouterr().err


def test_bench_with_ep_leaves_the_graph_modes_out_by_default():
    from types import SimpleNamespace

    from unmask.commands.bench import bench_modes

    modes = bench_modes(SimpleNamespace(modes=None, ep=2), "cuda", block_diffusion=False)
    assert "dual+cfg" in modes and not any("graph" in m for m in modes)
    assert any("graph" in m for m in bench_modes(SimpleNamespace(modes=None, ep=None), "cuda", False))
