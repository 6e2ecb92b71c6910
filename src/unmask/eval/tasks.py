"""Zero-shot tasks: rows of public datasets -> (context, continuation) requests, as lm-eval builds them.

Each task reads one local file in its public dataset's schema (never the hub): DATA_DIR/<name>.jsonl,
.json (a list of rows) or .parquet. The prompt formats, answer delimiters and metrics are those of
lm-evaluation-harness 0.4 (its task YAMLs), so numbers are comparable with lm-eval's:

  task           file (split)                           prompt -> continuation
  arc_easy       arc_easy.jsonl (ARC-Easy test)         "Question: {question}\\nAnswer:" -> " {choice}"
  arc_challenge  arc_challenge.jsonl (ARC-Challenge test)  same as arc_easy
  boolq          boolq.jsonl (validation)               "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no"/" yes"
  hellaswag      hellaswag.jsonl (validation)           "{activity_label}: {ctx_a} {Ctx_b}" (cleaned) -> " {ending}"
  openbookqa     openbookqa.jsonl (main test)           "{question_stem}" -> " {choice}"
  piqa           piqa.jsonl (validation)                "Question: {goal}\\nAnswer:" -> " {sol}"
  siqa           siqa.jsonl (validation)                "Q: {context} {question}\\nA:" -> " {answerX}"
  winogrande     winogrande.jsonl (xl validation)       "{sentence up to _ with option}" -> " {rest of sentence}"
  race           race.jsonl (high test)                 "Article: ...\\n\\n{earlier Q/A}{question}" -> " {option}"
  lambada        lambada.jsonl (lambada_openai test)    "{text minus last word}" -> " {last word}"

The bundled tasks (src/unmask/assets/suite) use the formats of their schema twins. The default
suite, of the bundled knowledge model (unmask.data.knowledge): know_arc like arc, know_boolq like
boolq, know_obqa like openbookqa, know_lambada like lambada, know_piqa like piqa. The first
model's suite (unmask.data.world) stays available by name: world_mc, world_boolq, world_cloze,
world_piqa, world_obqa.
Metrics: acc for every choice task, plus acc_norm (log-likelihood divided by the choice's length
in characters, as lm-eval computes it) where lm-eval reports it; lambada: acc (the greedy
sampler reproduces the last word) and ppl (exp of minus the mean log-likelihood of the word).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.knowledge import TASKS as KNOWLEDGE_TASKS

SUITE_DIR = Path(__file__).resolve().parents[1] / "assets" / "suite"
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Item:
    """One question: the (context, continuation) pairs to compare and the index of the right one.

    `norm_lengths` are what acc_norm divides the log-likelihoods by (lm-eval: the characters of
    each choice). A cloze item has one pair, the text to reproduce."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    norm_lengths: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                       # "choice" (pick the likeliest request) or "cloze" (greedy + ppl)
    metrics: tuple[str, ...]
    to_item: Callable[[dict], Item]
    schema: str                     # where the rows come from, for error messages
    bundled: bool = False

    @property
    def primary(self) -> str:
        """The metric `--cfg-scale auto` maximises on the dev slice."""
        return "acc"


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    return value


def choice_item(context: str, choices: list[str], gold: int) -> Item:
    """lm-eval's multiple_choice request layout: one shared context, " " + each choice.

    Refuses what would be scored silently wrong: a non-string context or choice, an empty choice
    (acc_norm would divide by its length 0), fewer than two choices, a gold index out of range."""
    _text(context, "the context")
    if len(choices) < 2:
        raise ValueError(f"an item needs at least 2 choices, got {len(choices)}")
    for c in choices:
        if not _text(c, "a choice").strip():
            raise ValueError("a choice is empty")
    if isinstance(gold, bool) or not 0 <= int(gold) < len(choices):
        raise ValueError(f"the answer index {gold!r} is not one of the {len(choices)} choices")
    return Item(tuple((context, " " + c) for c in choices), int(gold), tuple(len(c) for c in choices))


def arc_item(d: dict) -> Item:
    return choice_item(f"Question: {_text(d['question'], 'question')}\nAnswer:", list(d["choices"]["text"]),
                       list(d["choices"]["label"]).index(d["answerKey"]))


def boolq_item(d: dict) -> Item:
    if "label" in d:  # super_glue
        if d["label"] not in (0, 1):
            raise ValueError(f"label must be 0 or 1, not {d['label']!r}")
        gold = int(d["label"])
    elif isinstance(d["answer"], bool):  # google/boolq
        gold = int(d["answer"])
    else:
        raise ValueError(f"answer must be true or false, not {d['answer']!r}")
    passage, question = _text(d["passage"], "passage"), _text(d["question"], "question")
    return choice_item(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], gold)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's preprocessing: drop WikiHow's bracketed artifacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(d: dict) -> Item:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return choice_item(_hellaswag_clean(d["activity_label"] + ": " + ctx),
                       [_hellaswag_clean(e) for e in d["endings"]], int(d["label"]))


def openbookqa_item(d: dict) -> Item:
    return choice_item(_text(d["question_stem"], "question_stem"), list(d["choices"]["text"]),
                       list(d["choices"]["label"]).index(d["answerKey"].lstrip()))


def piqa_item(d: dict) -> Item:
    return choice_item(f"Question: {_text(d['goal'], 'goal')}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def siqa_item(d: dict) -> Item:
    return choice_item(f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]],
                       int(d["label"]) - 1)


def winogrande_item(d: dict) -> Item:
    """Partial scoring: each option fills the blank in the context; the rest of the sentence, the
    same for both, is the continuation scored."""
    cut = d["sentence"].index("_")
    contexts = [d["sentence"][:cut] + option for option in (d["option1"], d["option2"])]
    rest = " " + d["sentence"][cut + 1:].strip()
    return Item(tuple((c, rest) for c in contexts), int(d["answer"]) - 1, tuple(len(c) for c in contexts))


def race_item(d: dict) -> Item:
    """The article, the earlier questions of the same article answered, then the last question."""
    problems = d["problems"] if isinstance(d["problems"], list) else ast.literal_eval(d["problems"])
    letter = {"A": 0, "B": 1, "C": 2, "D": 3}
    text = "Article: " + d["article"] + "\n\n"
    for p in problems[:-1]:
        answer = p["options"][letter[p["answer"]]]
        if p["question"][-6:] == "  _  .":
            text += p["question"][:-5] + answer + "\n"
        else:
            text += "Question: " + p["question"] + "\n" + "Answer: " + answer + "\n"
    last = problems[-1]
    return choice_item(text + last["question"], list(last["options"][:4]), letter[last["answer"]])


def lambada_item(d: dict) -> Item:
    words = _text(d["text"], "text").split(" ")
    if len(words) < 2 or not words[-1].strip() or not " ".join(words[:-1]).strip():
        raise ValueError("text needs a context and a last word to predict, separated by a space")
    return Item(((" ".join(words[:-1]), " " + words[-1]),), 0, (len(words[-1]),))


_CHOICE, _NORM = ("acc",), ("acc", "acc_norm")
_CLOZE = ("acc", "ppl")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "choice", _NORM, arc_item, "allenai/ai2_arc ARC-Easy, test split"),
    Task("arc_challenge", "choice", _NORM, arc_item, "allenai/ai2_arc ARC-Challenge, test split"),
    Task("boolq", "choice", _CHOICE, boolq_item, "super_glue boolq (label) or google/boolq (answer), validation"),
    Task("hellaswag", "choice", _NORM, hellaswag_item, "Rowan/hellaswag, validation split"),
    Task("openbookqa", "choice", _NORM, openbookqa_item, "allenai/openbookqa main, test split"),
    Task("piqa", "choice", _NORM, piqa_item, "baber/piqa (ybisk/piqa), validation split"),
    Task("siqa", "choice", _CHOICE, siqa_item, "lighteval/siqa (social_i_qa), validation split"),
    Task("winogrande", "choice", _CHOICE, winogrande_item, "allenai/winogrande winogrande_xl, validation"),
    Task("race", "choice", _CHOICE, race_item, "EleutherAI/race high, test split"),
    Task("lambada", "cloze", _CLOZE, lambada_item, "EleutherAI/lambada_openai, test split"),
    Task("world_mc", "choice", _NORM, arc_item, "ARC schema (bundled suite)", bundled=True),
    Task("world_boolq", "choice", _CHOICE, boolq_item, "BoolQ schema (bundled suite)", bundled=True),
    Task("world_cloze", "cloze", _CLOZE, lambada_item, "LAMBADA schema (bundled suite)", bundled=True),
    Task("world_piqa", "choice", _NORM, piqa_item, "PIQA schema (bundled suite)", bundled=True),
    Task("world_obqa", "choice", _NORM, openbookqa_item, "OpenBookQA schema (bundled suite)", bundled=True),
    Task("know_arc", "choice", _NORM, arc_item, "ARC schema (bundled knowledge suite)", bundled=True),
    Task("know_boolq", "choice", _CHOICE, boolq_item, "BoolQ schema (bundled knowledge suite)", bundled=True),
    Task("know_obqa", "choice", _NORM, openbookqa_item, "OpenBookQA schema (bundled knowledge suite)", bundled=True),
    Task("know_lambada", "cloze", _CLOZE, lambada_item, "LAMBADA schema (bundled knowledge suite)", bundled=True),
    Task("know_piqa", "choice", _NORM, piqa_item, "PIQA schema (bundled knowledge suite)", bundled=True),
]}
ALIASES = {"social_iqa": "siqa", "lambada_openai": "lambada", "obqa": "openbookqa"}
BUNDLED_TASKS = [name for name, t in TASKS.items() if t.bundled]
DEFAULT_TASKS = list(KNOWLEDGE_TASKS)  # the bundled model's suite


def get_task(name: str) -> Task:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def find_data_file(task: Task, data_dir: str | Path | None) -> Path:
    """DATA_DIR/<task>.{jsonl,json,parquet}; bundled tasks fall back to the shipped suite."""
    dirs = [Path(data_dir)] if data_dir is not None else []
    if task.bundled:
        dirs.append(SUITE_DIR)
    for d in dirs:
        for ext in DATA_EXTENSIONS:
            if (d / f"{task.name}{ext}").is_file():
                return d / f"{task.name}{ext}"
    where = Path(data_dir) if data_dir is not None else Path("DATA_DIR")
    hint = "" if data_dir is not None else " and pass --data-dir DATA_DIR"
    raise FileNotFoundError(f"task {task.name}: data file not found; put the rows ({task.schema}) in "
                            f"{where / task.name}.jsonl (or .json/.parquet){hint}")


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs: "line N" of a JSONL file (blank lines counted), "row N" otherwise."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                             "or convert the file to .jsonl") from None
        return [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    if path.suffix == ".json":
        rows = _json(text, path)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json task file holds a list of rows")
        return [(f"row {i}", r) for i, r in enumerate(rows, 1)]
    return [(f"line {n}", _json(line, path, f"line {n}")) for n, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _json(text: str, path: Path, where: str | None = None):
    """Parse JSON from a task file; what cannot be read, nesting too deep for the parser included
    (a RecursionError otherwise), is a ValueError naming the file (and line)."""
    at = f"{path}: {where}" if where else str(path)
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{at} is nested too deeply to read as JSON") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{at} is not valid JSON ({e.msg}, column {e.colno})") from None
    except ValueError as e:   # e.g. an integer of more digits than Python converts
        raise ValueError(f"{at} is not readable JSON ({e})") from None


def load_items(task: Task, data_dir: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """The task's items in file order (the first `limit`); a malformed row names its line."""
    path = find_data_file(task, data_dir)
    items = []
    for where, row in read_rows(path)[:limit]:
        try:
            if not isinstance(row, dict):
                raise TypeError(f"a row is a JSON object, not {type(row).__name__}")
            items.append(task.to_item(row))
        except (KeyError, ValueError, TypeError, IndexError, SyntaxError, AttributeError) as e:
            raise ValueError(f"{path}: {where} does not fit the {task.name} schema "
                             f"({task.schema}): {type(e).__name__}: {e}") from None
    return items
