"""Zero-shot tasks (lm-eval formats on tiny files in public schemas), the runner, the report, `unmask eval`."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from unmask.cli import main
from unmask.eval import BUNDLED_TASKS, EvalConfig, evaluate, get_task, load_items, markdown_table
from unmask.eval.encoding import encode_pair
from unmask.eval.runner import ItemScore, item_metrics, mcnemar_p, paired_delta
from unmask.models import MaskedDiffusionLM, ModelConfig, save_model

TASK_DIR = Path(__file__).parent / "data" / "tasks"


def make_tiny_checkpoint(directory: Path) -> Path:
    """A random 1-layer model with a byte-level BPE tokenizer trained on the test task files."""
    from unmask.data.tokenizer import special_token_ids, train_tokenizer

    texts = [line for f in sorted(TASK_DIR.glob("*.jsonl")) for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    ids = special_token_ids(tokenizer)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      mlp_hidden_size=64, max_seq_len=256, mask_token_id=ids["mask"], eos_token_id=ids["eos"])
    save_model(MaskedDiffusionLM(cfg), directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


FIRST_ITEMS = {
    "arc_easy": (("Question: Which gas do plants take in?\nAnswer:", " oxygen"), 4, 1),
    "boolq": (("The sky looks blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " no"), 2, 1),
    "hellaswag": (("Removing ice from car: Then, the man writes over the snow covering the window of a car. Then",
                   " , the man adds wax to the windshield."), 4, 3),   # lm-eval's " " + ending, as it does
    "openbookqa": (("The sun is responsible for", " puppies learning new tricks"), 4, 1),
    "piqa": (("Question: How do I open a jar?\nAnswer:", " Twist the lid."), 2, 0),
    "siqa": (("Q: Tracy gave Jan a gift. How would Jan feel?\nA:", " happy"), 3, 0),
    "winogrande": (("The trophy does not fit in the suitcase because the trophy", " is too big."), 2, 0),
    "race": (("Article: Tom has a red bike. He rides it to school every day.\n\n"
              "Question: What colour is the bike?\nAnswer: red\nTom rides to school every day\n"
              "Where does Tom ride?", " home"), 4, 1),
    "lambada": (("She opened the door and saw her old friend standing there with a", " smile"), 1, 0),
}


@pytest.mark.parametrize("name", sorted(FIRST_ITEMS))
def test_task_formats_match_lm_eval(name):
    first_request, n_choices, gold = FIRST_ITEMS[name]
    item = load_items(get_task(name), TASK_DIR)[0]
    assert item.requests[0] == first_request
    assert len(item.requests) == n_choices and item.gold == gold


def test_format_details():
    hs = load_items(get_task("hellaswag"), TASK_DIR)[1]       # WikiHow brackets removed
    assert hs.requests[0] == ("Home and Garden: How to water plants. Fill a can. Pour it", " slowly over the soil.")
    wino = load_items(get_task("winogrande"), TASK_DIR)[0]    # partial scoring: same continuation
    assert {cont for _, cont in wino.requests} == {" is too big."}
    assert wino.requests[1][0].endswith("because the suitcase")
    assert load_items(get_task("openbookqa"), TASK_DIR)[1].gold == 1        # answerKey " B"
    assert load_items(get_task("arc_easy"), TASK_DIR)[1].gold == 0          # numeric labels
    assert get_task("social_iqa") is get_task("siqa")


def test_bundled_suite_tasks_load():
    for name in BUNDLED_TASKS:
        items = load_items(get_task(name))
        assert len(items) == (312 if name.startswith("know_") else 250)
    from unmask.eval.tasks import SUITE_DIR

    boolq = [json.loads(line) for line in (SUITE_DIR / "world_boolq.jsonl").read_text().splitlines()[:5]]
    assert [i.gold for i in load_items(get_task("world_boolq"), limit=5)] == [int(r["answer"]) for r in boolq]


def test_missing_data_file_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task piqa: .*" + str(tmp_path / "piqa") + r"\.jsonl"):
        load_items(get_task("piqa"), tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_items(get_task("piqa"))


GOOD_ROWS = {
    "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
    "boolq": {"passage": "p", "question": "q", "answer": True},
    "lambada": {"text": "the cat sat"},
    "arc_easy": {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
}
BAD_ROWS = [
    ("piqa", {"sol1": ""}, "a choice is empty"),
    ("piqa", {"label": 2}, "answer index 2"),
    ("boolq", {"answer": 5}, "true or false"),
    ("boolq", {"label": 5}, "0 or 1"),
    ("lambada", {"text": ""}, "last word"),
    ("lambada", {"text": "word"}, "last word"),
    ("arc_easy", {"question": 3}, "question must be a string"),
]


@pytest.mark.parametrize("task,change,message", BAD_ROWS)
def test_malformed_task_rows_are_refused_with_file_and_line(tmp_path, task, change, message):
    good = json.dumps(GOOD_ROWS[task])
    bad = json.dumps({**GOOD_ROWS[task], **change})
    (tmp_path / f"{task}.jsonl").write_text(f"{good}\n\n{bad}\n")   # the bad row is on line 3
    with pytest.raises(ValueError, match=rf"{task}\.jsonl: line 3 .*{message}"):
        load_items(get_task(task), tmp_path)
    assert len(load_items(get_task(task), tmp_path, limit=1)) == 1


def test_invalid_json_names_its_line(tmp_path):
    (tmp_path / "piqa.jsonl").write_text(json.dumps(GOOD_ROWS["piqa"]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"piqa\.jsonl: line 2 is not valid JSON"):
        load_items(get_task("piqa"), tmp_path)
    (tmp_path / "piqa.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 .*JSON object"):
        load_items(get_task("piqa"), tmp_path)


def test_parquet_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(line) for line in (TASK_DIR / "piqa.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "piqa.parquet")
    assert load_items(get_task("piqa"), tmp_path) == load_items(get_task("piqa"), TASK_DIR)


def test_acc_norm_divides_by_choice_characters():
    item = load_items(get_task("arc_easy"), TASK_DIR)[0]      # oxygen, carbon dioxide, helium, neon; gold 1
    score = ItemScore(0, [[-6.0, -7.0, -9.0, -8.0]])
    m = item_metrics(get_task("arc_easy"), item, score, 0)
    assert m == {"acc": 0.0, "acc_norm": 1.0}                 # -7/14 beats -6/6


def test_mcnemar_exact_two_sided():
    assert mcnemar_p([0] * 10, [1] * 10) == pytest.approx(2 / 2 ** 10)   # 10 gained, 0 lost
    assert mcnemar_p([1, 0, 1, 0], [0, 1, 1, 0]) == 1.0                    # one each way
    assert mcnemar_p([1, 1], [1, 1]) == 1.0                                # no discordant pair
    # 7 gained, 2 lost: 2 * P(X <= 2), X ~ Binomial(9, 1/2) = 2 * 46 / 512
    assert mcnemar_p([0] * 7 + [1] * 2 + [1] * 5, [1] * 7 + [0] * 2 + [1] * 5) == pytest.approx(92 / 512)


def test_paired_delta_uses_the_same_items():
    base, other = [0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 0, 1]
    d = paired_delta("acc", base, other)
    assert d.delta == pytest.approx(2 / 6) and d.p_value == pytest.approx(0.5)
    diffs = [1, 1, 0, 0, 0, 0]
    mean = sum(diffs) / 6
    assert d.stderr == pytest.approx((sum((x - mean) ** 2 for x in diffs) / 5 / 6) ** 0.5)
    ppl = paired_delta("ppl", [-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0])
    assert ppl.delta == 0 and ppl.p_value == 1.0


def test_encode_pair_moves_trailing_space(ckpt):
    from unmask.models import load_tokenizer

    tok = load_tokenizer(ckpt)
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = encode_pair(tok, "a b c d e f g h", " i", max_len=4)
    assert len(ctx) + len(cont) == 4 and tok.decode(cont) == " i"


def test_unmask_eval_cli_end_to_end(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(ckpt), "--data-dir", str(TASK_DIR), "--tasks", "arc_easy,lambada,winogrande",
               "--limit", "2", "--mc-num", "4", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in data["results"]] == ["arc_easy", "lambada", "winogrande"]
    arc = data["results"][0]
    assert arc["columns"] == ["w=0", "w=1"] and set(arc["metrics"]) == {"acc", "acc_norm"}
    assert set(data["results"][1]["metrics"]) == {"acc", "ppl"}
    table = (out / "results.md").read_text()
    assert "| arc_easy | acc |" in table and "Δ w=1" in table and "(p=" in table
    assert set(arc["paired"]) == {"acc", "acc_norm"} and len(arc["paired"]["acc"]) == 1
    assert "| lambada | ppl ↓ |" in capsys.readouterr().out


def test_unmask_eval_auto_on_bundled_suite(ckpt, tmp_path):
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(ckpt), "--tasks", "world_mc,world_cloze", "--limit", "5",
               "--cfg-scale", "auto", "0", "0.5", "2", "--mc-num", "4", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())["results"]
    for r in results:
        assert r["columns"] == ["w=0", "auto"] and r["n"] == 4            # test items only
        assert r["dev"]["n"] == 1 and r["dev"]["scales"] == [0.0, 0.5, 2.0]
        assert r["chosen_scale"] in (0.0, 0.5, 2.0) and r["scales"] == [0.0, r["chosen_scale"]]
    assert "Dev slice" in (out / "results.md").read_text()


def test_unmask_eval_user_errors(ckpt, capsys):
    assert main(["eval", "--model", str(ckpt), "--tasks", "arc_easy"]) == 2
    assert "arc_easy.jsonl" in capsys.readouterr().err
    assert main(["eval", "--tasks", "nope"]) == 2
    assert main(["eval", "--model", str(ckpt), "--cfg-scale", "0", "x"]) == 2


def _sharded_worker(rank, world, init_file, ckpt, out_dir):
    import torch.distributed as dist

    import unmask

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, tok = unmask.load(ckpt)
    results = evaluate(model, tok, [get_task("arc_easy"), get_task("lambada"), get_task("world_piqa")], TASK_DIR,
                       SHARD_CONFIG)
    if rank == 0:
        Path(out_dir, "sharded.json").write_text(json.dumps([asdict(r) for r in results]))
    dist.destroy_process_group()


SHARD_CONFIG = EvalConfig(cfg_scales=(0.0, 1.0), mc_num=4, batch_size=4, limit=5, progress=False, seed=7)


@pytest.mark.slow
def test_two_process_sharding_matches_one_process(ckpt, tmp_path):
    import torch.multiprocessing as mp

    import unmask

    model, tok = unmask.load(ckpt)
    single = evaluate(model, tok, [get_task("arc_easy"), get_task("lambada"), get_task("world_piqa")], TASK_DIR,
                      SHARD_CONFIG)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(ckpt), str(tmp_path)), nprocs=2)
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert sharded == json.loads(json.dumps([asdict(r) for r in single]))
    assert markdown_table(single).count("\n") >= 5
