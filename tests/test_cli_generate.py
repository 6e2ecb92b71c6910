"""`unmask generate` / `unmask chat` end to end on a checkpoint directory, and their one-line errors."""

import subprocess
import sys

import torch

import unmask
from unmask.cli import main
from unmask.sampling.text import completion_ids, encode_prompt, generate_text


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "unmask.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_generate_prints_the_completion(tiny_checkpoint):
    r = run_cli("generate", "hello", "--model", str(tiny_checkpoint), "--gen-length", "8", "--steps", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello")
    model, tok = unmask.load(tiny_checkpoint)
    expected = generate_text(model, tok, ["hello"], steps=8, gen_length=8, block_length=8)[0]
    assert r.stdout == "hello" + expected + "\n"


def test_generate_chat_and_show_steps(tiny_checkpoint, capsys):
    assert main(["generate", "hi", "--model", str(tiny_checkpoint), "--chat", "--gen-length", "8",
                 "--block-length", "4", "--steps", "4", "--show-steps", "--cfg-scale", "1"]) == 0
    err = capsys.readouterr().err
    assert "[step 4]" in err and "\x1b8" in err


def test_chat_session(tiny_checkpoint):
    r = run_cli("chat", "--model", str(tiny_checkpoint), "--gen-length", "8", stdin="hi\nagain\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 2


def test_errors_are_one_line(tmp_path):
    r = run_cli("generate", "x", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", "x", "--model", str(tmp_path))
    assert r.returncode == 2 and "config.json is missing" in r.stderr and "Traceback" not in r.stderr


def test_bad_sampling_arguments_are_one_line(tiny_checkpoint):
    r = run_cli("generate", "x", "--model", str(tiny_checkpoint), "--gen-length", "10", "--block-length", "4")
    assert r.returncode == 2 and "multiple of block_length" in r.stderr and "Traceback" not in r.stderr


def test_encode_prompt_uses_chat_template(tiny_checkpoint):
    tok = unmask.load_tokenizer(tiny_checkpoint)
    ids = encode_prompt(tok, "hi", chat=True)
    assert tok.decode(ids) == "<|user|>\nhi<|eot|><|assistant|>\n"


def test_completion_ids_cut_at_stop():
    assert completion_ids([5, 6, 381, 7], [380, 381]) == ([5, 6], True)
    assert completion_ids([5, 383, 6], [381], mask_id=383) == ([5, 6], False)


def test_generate_text_batches_prompts_of_different_lengths(tiny_checkpoint):
    model, tok = unmask.load(tiny_checkpoint, dtype=torch.float64)
    kw = dict(steps=8, gen_length=8, block_length=8, cfg_scale=1.0)
    batch = generate_text(model, tok, ["a", "a much longer prompt"], **kw)
    assert batch == [generate_text(model, tok, [p], **kw)[0] for p in ["a", "a much longer prompt"]]


def test_generate_text_in_batches_of_batch_size_gives_the_same_texts(tiny_checkpoint, monkeypatch):
    """`batch_size` splits the prompts into passes (memory), never the output: in order, all of them."""
    from unmask.sampling import text
    model, tok = unmask.load(tiny_checkpoint, dtype=torch.float64)
    kw = dict(steps=8, gen_length=8, block_length=8, cfg_scale=1.0)
    prompts = ["a", "a much longer prompt", "b c", "hello there", "x"]
    whole = generate_text(model, tok, prompts, **kw)
    calls, real = [], text.complete_ids

    def counted(model, tokenizer, ids, **kwargs):
        calls.append(len(ids))
        return real(model, tokenizer, ids, **kwargs)
    monkeypatch.setattr(text, "complete_ids", counted)
    assert generate_text(model, tok, prompts, batch_size=2, **kw) == whole
    assert calls == [2, 2, 1] and len(set(whole)) > 1
    assert generate_text(model, tok, [], batch_size=2, **kw) == []


def test_fast_sampling_flags_reach_the_sampler(tiny_checkpoint, capsys):
    args = ["--gen-length", "16", "--block-length", "8", "--cfg-scale", "1", "--cache", "dual", "--threshold", "0.2",
            "--reuse-uncond"]
    assert main(["generate", "hello", "--model", str(tiny_checkpoint), *args]) == 0
    model, tok = unmask.load(tiny_checkpoint)
    expected = generate_text(model, tok, ["hello"], steps=16, gen_length=16, block_length=8, cfg_scale=1.0,
                             cache="dual", threshold=0.2, reuse_uncond=True)[0]
    assert capsys.readouterr().out == "hello" + expected + "\n"
    r = run_cli("generate", "x", "--model", str(tiny_checkpoint), "--gen-length", "8", "--reuse-uncond")
    assert r.returncode == 2 and "reuse_uncond" in r.stderr and "needs cache=" in r.stderr
    r = run_cli("generate", "x", "--model", str(tiny_checkpoint), "--gen-length", "8", "--cuda-graph")
    assert r.returncode == 2 and "cache='dual'" in r.stderr and "Traceback" not in r.stderr


def test_generate_reads_the_prompt_from_stdin_and_help_shows_defaults(tiny_checkpoint):
    r = run_cli("generate", "--model", str(tiny_checkpoint), "--gen-length", "8", stdin="hello")
    assert r.returncode == 0 and r.stdout.startswith("hello")
    r = run_cli("generate", "--model", str(tiny_checkpoint), stdin="")
    assert r.returncode == 2 and "empty" in r.stderr
    r = run_cli("generate", "--help")
    assert "(default: 64)" in r.stdout and "stdin" in r.stdout


def test_a_backslash_n_in_the_prompt_argument_is_a_line_break(tiny_checkpoint):
    """`unmask generate "Question: ...\\nAnswer:"` as typed in a shell prompts with a real newline."""
    r = run_cli("generate", "Q: hi\\nA:", "--model", str(tiny_checkpoint), "--gen-length", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Q: hi\nA:")
    model, tok = unmask.load(tiny_checkpoint)
    assert r.stdout == "Q: hi\nA:" + generate_text(model, tok, ["Q: hi\nA:"], steps=8, gen_length=8,
                                                   block_length=8)[0] + "\n"
