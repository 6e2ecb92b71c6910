"""`unmask eval --guidance F1 F2 ...`: several forms in one run, sharing the conditional passes, and
`--guidance auto`, which picks the form and the scale on the dev slice."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import unmask
from test_eval import TASK_DIR, make_tiny_checkpoint
from unmask.cli import main
from unmask.eval import EvalConfig, evaluate, get_task, load_items, markdown_table
from unmask.eval.runner import item_metrics, score_item, task_columns
from unmask.likelihood import PMI, Column, Request, score_requests
from unmask.sampling.guidance import Guidance

FORMS = ("prompt", "linear,span:-4:", "span:0:-2")
BUNDLED = Path(unmask.__file__).parent / "assets"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def bundled():
    return unmask.load(BUNDLED / "model")


class ForwardCounter:
    """Counts the model's forward calls and the rows they carry."""

    def __init__(self, model):
        self.calls, self.rows = 0, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.rows += args[0].shape[0]

    def __exit__(self, *exc):
        self.handle.remove()

    def __enter__(self):
        return self


def test_short_spec_drops_the_defaults_and_parses_back():
    for spec, short in [("constant,prompt", "prompt"), ("linear", "linear"), ("span:0:-4", "span:0:-4"),
                        ("interval:0.5:1,span:-8:", "interval:0.5:1,span:-8:")]:
        form = Guidance.parse(spec)
        assert form.short() == short and Guidance.parse(short) == form


def test_columns_of_several_forms_equal_separate_runs_and_share_the_conditional_rows(bundled):
    model, _ = bundled
    g = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(5, 300, (n,), generator=g).tolist(),
                        torch.randint(5, 300, (4,), generator=g).tolist(), seed=n) for n in (6, 9, 12)]
    scales = [0.0, 1.0, 2.0, PMI]
    columns = [Column(0.0)] + [Column(w, Guidance.parse(f)) for f in FORMS for w in scales[1:]]
    kw = dict(mc_num=8, batch_size=8)
    with ForwardCounter(model) as multi_count:
        multi = score_requests(model, requests, cfg_scales=columns, **kw)
    for k, form in enumerate(FORMS):
        with ForwardCounter(model) as single_count:
            single = score_requests(model, requests, cfg_scales=scales, guidance=form, **kw)
        for r in range(len(requests)):
            got = [multi[r][0], *multi[r][1 + 3 * k:4 + 3 * k]]
            assert [e.value for e in got] == pytest.approx([e.value for e in single[r]], rel=1e-6, abs=1e-6)
    # one forward per chunk, as one form needs; each holds the conditional rows once and one block per canvas
    assert multi_count.calls == single_count.calls
    assert multi_count.rows == single_count.rows // 2 * (1 + len(FORMS))


def test_forms_that_differ_only_in_the_schedule_share_the_unconditional_rows(bundled):
    model, _ = bundled
    requests = [Request([11, 12, 13, 14, 15], [16, 17, 18])]
    with ForwardCounter(model) as count:
        score_requests(model, requests, cfg_scales=[Column(1.0), Column(1.0, Guidance.parse("linear")),
                                                    Column(PMI, Guidance.parse("interval:0.5:1"))], mode="chain")
    assert count.calls == 1 and count.rows == 2 * 3      # 3 chain rows, conditional + one prompt-masked canvas


def _config(**kw):
    base = dict(cfg_scales=(0.0, 1.0, 2.0), mc_num=4, batch_size=8, limit=3, progress=False, seed=3)
    return EvalConfig(**{**base, **kw})


def test_eval_over_several_forms_matches_one_run_per_form(ckpt):
    model, tok = unmask.load(ckpt)
    tasks = [get_task("arc_easy"), get_task("lambada")]
    multi = evaluate(model, tok, tasks, TASK_DIR, _config(guidance=FORMS, pmi=True))
    arc, lambada = multi
    assert arc.columns == ["w=0", "prompt w=1", "prompt w=2", "linear,span:-4: w=1", "linear,span:-4: w=2",
                           "span:0:-2 w=1", "span:0:-2 w=2", "pmi prompt", "pmi span:-4:", "pmi span:0:-2"]
    assert arc.forms[:2] == ["none", "prompt"] and lambada.columns == arc.columns[:7]
    for form in FORMS:
        label = Guidance.parse(form).short()
        for one, many in zip(evaluate(model, tok, tasks, TASK_DIR, _config(guidance=form, pmi=True)), multi):
            for c, column in enumerate(one.columns):
                name = "w=0" if c == 0 else (f"pmi {Guidance.parse(form).canvas}" if column == "pmi"
                                             else f"{label} {column}")
                m = many.columns.index(name)
                for metric in one.metrics:
                    assert many.metrics[metric][m].value == pytest.approx(one.metrics[metric][c].value, abs=1e-9)
                    if c:
                        assert asdict(many.paired[metric][m - 1]) == pytest.approx(asdict(one.paired[metric][c - 1]))
    assert "| arc_easy | acc |" in markdown_table(multi) and "Δ span:0:-2 w=2" in markdown_table(multi)


def test_eval_counts_one_conditional_pass_for_all_forms(ckpt):
    """Multiple-choice scoring: the forward calls of three forms are those of one (the cloze tasks'
    greedy check runs the sampler per column, which no form can share)."""
    model, tok = unmask.load(ckpt)
    task = [get_task("arc_easy")]
    with ForwardCounter(model) as one:
        evaluate(model, tok, task, TASK_DIR, _config(guidance="prompt"))
    with ForwardCounter(model) as three:
        evaluate(model, tok, task, TASK_DIR, _config(guidance=FORMS))
    assert three.calls == one.calls and three.rows == one.rows // 2 * 4


@pytest.mark.slow
def test_guidance_auto_picks_form_and_scale_on_the_dev_slice_only(bundled, tmp_path):
    """The dev slice holds items a guided column gets right and w = 0 wrong; the test slice is then
    either neutral items or items the picked column gets wrong and w = 0 right: the pick, made on the
    dev slice, must not move."""
    model, tok = bundled
    task = get_task("know_obqa")
    config = EvalConfig(cfg_scales=(0.0, 1.0, 2.0), auto=True, guidance=("prompt", "span:-8:", "span:0:-4"),
                        mode="chain", dev_fraction=0.5, progress=False)
    lines = (BUNDLED / "suite" / "know_obqa.jsonl").read_text().splitlines()
    items = load_items(task, None, 50)   # enough gains, neutral items and losses on the bundled model
    columns, _, _ = task_columns(task, config)
    right = [[item_metrics(task, item, score_item(model, tok, task, item, i, columns, config), s)["acc"]
              for s in range(len(columns))] for i, item in enumerate(items)]
    gains = [i for i, r in enumerate(right) if r[0] == 0 and any(r[1:])][:3]
    neutral = [i for i, r in enumerate(right) if len(set(r)) == 1][:3]
    assert len(gains) == 3 and len(neutral) == 3

    def run(name: str, test: list[int]):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "know_obqa.jsonl").write_text("".join(lines[i] + "\n" for i in gains + test))
        return evaluate(model, tok, [task], directory, config)[0]

    a = run("neutral", neutral)
    picked = next(s for s in range(len(columns))
                  if (a.dev.forms[s], a.dev.scales[s]) == (a.chosen_form, a.chosen_scale))
    dev = a.dev.metrics["acc"]
    assert picked == max(range(len(dev)), key=lambda s: (dev[s].value, -a.dev.scales[s], -s)) and a.chosen_scale > 0
    losses = [i for i, r in enumerate(right) if r[0] == 1 and r[picked] == 0][:3]
    assert len(losses) == 3
    b = run("against", losses)
    assert asdict(a.dev) == asdict(b.dev) and (a.chosen_form, a.chosen_scale) == (b.chosen_form, b.chosen_scale)
    assert b.metrics["acc"][1].value == 0 < b.metrics["acc"][0].value    # the test slice would have argued against it
    assert a.n == b.n == 3 and a.columns == ["w=0", "auto"] and a.forms == ["none", a.chosen_form]
    assert "| auto form | auto w | dev n |" in markdown_table([a, b])


def test_cli_several_forms_and_auto(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["eval", "--model", str(ckpt), "--data-dir", str(TASK_DIR), "--tasks", "arc_easy", "--limit", "3",
            "--mc-num", "4"]
    assert main([*base, "--guidance", "prompt", "span:-4:", "--cfg-scale", "0", "1", "--pmi", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["guidance"] == ["prompt", "span:-4:"]
    assert data["results"][0]["columns"] == ["w=0", "prompt w=1", "span:-4: w=1", "pmi prompt", "pmi span:-4:"]
    assert "Δ span:-4: w=1" in capsys.readouterr().out
    assert main([*base, "--guidance", "auto", "--cfg-scale", "0", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert result["dev"]["forms"] == ["none", "prompt", "linear", "span:0:-4", "span:-8:"]
    assert result["columns"] == ["w=0", "auto"] and result["chosen_form"] in result["dev"]["forms"]


@pytest.mark.parametrize("forms,message", [(["prompt", "cosine"], "unknown guidance part 'cosine'"),
                                           (["span:0:-4", "acfg:0.5"], "scoring has none"),
                                           (["prompt", "constant"], "names the form 'prompt' twice"),
                                           (["auto", "span:1"], "write span:START:STOP")])
def test_cli_refuses_bad_forms_clearly(ckpt, capsys, forms, message):
    assert main(["eval", "--model", str(ckpt), "--guidance", *forms]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_pmi_with_guidance_auto(ckpt, capsys):
    assert main(["eval", "--model", str(ckpt), "--guidance", "auto", "--pmi"]) == 2
    assert "--guidance auto" in capsys.readouterr().err
