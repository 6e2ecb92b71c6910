"""lm-evaluation-harness adapter: `--model unmask`, with unsupervised CFG in scoring and sampling.

    python -m unmask.harness --model unmask \\
        --model_args model=DIR,cfg_scale=0.5,mc_num=128 --tasks know_arc,know_boolq

lm-eval has no plugin entry point, so this module registers the model and then runs lm-eval's own
command line (the pattern of LLaDA's and Dream's adapters). It also writes lm-eval task YAMLs
for the bundled world suite (with absolute paths to the shipped JSONL files) and passes their
directory as --include_path unless you give one: then call `write_suite_tasks(DIR)` yourself.
Everything stays offline: the hub is switched off before lm-eval (and so `datasets`) is imported.

Model args: model (checkpoint dir; default the bundled model), adapter (a LoRA adapter dir merged
into it, docs/lora.md), cfg_scale, guidance (the form of CFG for scoring and generation,
docs/guidance.md; not acfg, which cannot score), mc_num, mode ("mc" |
"chain"), check_greedy, steps, gen_length, block_length, remasking, device, dtype, seed; LLaDA's
adapter names work too (model_path, cfg, is_check_greedy), so its scripts run unchanged. lm-eval's
--batch_size is the number of rows per forward pass (doubled under CFG); `python -m
unmask.harness` uses 32 when it is not given (lm-eval's default of 1 would be slow).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from .eval.encoding import encode, encode_pair  # noqa: E402
from .eval.tasks import (SUITE_DIR, TASKS, arc_item, boolq_item, lambada_item, openbookqa_item,  # noqa: E402
                         piqa_item)
from .likelihood import Request, check_mode, document_bound, greedy_checks, score_requests  # noqa: E402
from . import load  # noqa: E402
from .models.loading import base_checkpoint  # noqa: E402
from .models.placement import resolve_dtype  # noqa: E402
from .sampling import block_generate, block_length_for, check_seed, generate  # noqa: E402
from .sampling.blocks import is_block_checkpoint  # noqa: E402
from .sampling.options import check_scoring_guidance, context_length, options_for  # noqa: E402

DEFAULT_BATCH_SIZE = 32


# LLaDA's adapter (llada_dist) names -> ours, so its eval scripts run by changing --model.
ALIASES = {"model_path": "model", "cfg": "cfg_scale", "is_check_greedy": "check_greedy"}


@register_model("unmask")
class UnmaskLM(LM):
    """A masked diffusion LM behind lm-eval's three request types.

    loglikelihood -> the bound of unmask.likelihood at `cfg_scale`, all requests scored together
    (rows of different requests share forward batches); is_greedy from the sampler at temperature
    0, one token per step, when check_greedy; loglikelihood_rolling -> document_bound;
    generate_until -> the sampler, cut at the first stop string and at max_gen_toks.
    Every option is checked before the model is loaded.
    """

    def __init__(self, model: str | None = None, adapter: str | None = None, cfg_scale: float = 0.0, mc_num: int = 128, mode: str = "mc",
                 check_greedy: bool = True, steps: int | None = None, gen_length: int = 128,
                 block_length: int | None = None, remasking: str | None = None, threshold: float | None = None,
                 guidance: str | None = None, device: str | None = None,
                 dtype: str | None = None, seed: int = 0, batch_size: int | str | None = None,
                 max_batch_size: int | None = None,  # max_batch_size: part of lm-eval's call, unused
                 **aliased):
        super().__init__()
        given = {"model": model, "cfg_scale": cfg_scale, "check_greedy": check_greedy}
        for alias, value in aliased.items():
            if alias not in ALIASES:
                raise ValueError(f"unknown model argument {alias!r} for --model unmask")
            given[ALIASES[alias]] = value
        path = base_checkpoint(given["model"], adapter)
        self.block = is_block_checkpoint(path)
        if not self.block:   # LLaDA's defaults: one step per token, one block
            steps = gen_length if steps is None else steps
            block_length = gen_length if block_length is None else block_length
        self.options = options_for(self.block, steps=steps, gen_length=gen_length, block_length=block_length,
                                   cfg_scale=given["cfg_scale"], remasking=remasking, threshold=threshold,
                                   guidance=guidance)
        check_scoring_guidance(self.options.guidance)   # the same form scores loglikelihood requests
        if type(mc_num) is not int or mc_num < 1:
            raise ValueError(f"mc_num must be a positive integer (got {mc_num!r})")
        self.mc_num, self.mode = mc_num, check_mode(mode)
        self.check_greedy, self.seed = bool(given["check_greedy"]), check_seed(seed)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.model, self.tokenizer = load(path, dtype=resolve_dtype(dtype), device=_available(device), adapter=adapter)
        self.max_len = context_length(self.model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    @property
    def cfg_scale(self) -> float:
        return self.options.cfg_scale

    @property
    def scoring(self) -> dict:
        """Likelihood settings shared by every request type; block-diffusion models are scored with
        their block length."""
        return dict(batch_size=self.batch_size, block_length=self.options.block_length if self.block else None,
                    guidance=self.options.guidance)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        pairs = [encode_pair(self.tokenizer, *inst.args, self.max_len) for inst in requests]
        scored = [Request(ctx, cont, self.seed * 1_000_003 + i) for i, (ctx, cont) in enumerate(pairs)]
        out = []
        with tqdm(total=len(scored), desc="loglikelihood", disable=disable_tqdm or self.rank != 0) as bar:
            for start in range(0, len(scored), self.batch_size):   # chunks only pace the progress bar
                chunk = scored[start:start + self.batch_size]
                estimates = score_requests(self.model, chunk, cfg_scales=[self.cfg_scale], mode=self.mode,
                                           mc_num=self.mc_num, **self.scoring)
                greedy = (greedy_checks(self.model, chunk, cfg_scale=self.cfg_scale, **self.scoring)
                          if self.check_greedy else [False] * len(chunk))
                out += [(est.value, bool(g)) for [est], g in zip(estimates, greedy)]
                bar.update(len(chunk))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [document_bound(self.model, encode(self.tokenizer, inst.args[0]), cfg_scale=self.cfg_scale,
                               mode=self.mode, mc_num=self.mc_num, seed=self.seed * 1_000_003 + i,
                               **self.scoring).value
                for i, inst in enumerate(requests)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate_one(*inst.args) for inst in requests]

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        """One completion. For LLaDA models a task's max_gen_toks is cut into whole blocks and the
        steps scaled to fit (block_length_for), since the task, not the user, chose that length;
        block-diffusion models take any length."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        gen_length = int(gen_kwargs.get("max_gen_toks", self.options.gen_length))
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
        if self.block:
            options = replace(self.options, gen_length=gen_length, temperature=temperature).check()
            sample = functools.partial(block_generate, eos_early_stop=self.model.config.eos_token_id is not None)
        else:
            block = block_length_for(gen_length, self.options.block_length)
            blocks = gen_length // block
            steps = max(blocks, min(gen_length, self.options.steps // blocks * blocks))
            options = replace(self.options, steps=steps, gen_length=gen_length, block_length=block,
                              temperature=temperature).check()
            sample = functools.partial(generate, stop_at_eos=self.model.config.eos_token_id is not None)
        ids = encode(self.tokenizer, context)
        if self.max_len is not None:   # a block-diffusion canvas is whole blocks
            room = self.max_len // options.block_length * options.block_length if self.block else self.max_len
            ids = ids[max(0, len(ids) - (room - gen_length)):]
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        out = sample(self.model, prompt, generator=generator, **options.kwargs())
        text = self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        parts = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _available(device: str | None) -> str:
    """lm-eval's CLI asks for "cuda" by default; fall back to the CPU where there is no GPU."""
    if device and (not device.startswith("cuda") or torch.cuda.is_available()):
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _metrics(*names: str) -> list[dict]:
    return [{"metric": n, "aggregation": "mean", "higher_is_better": True} for n in names]


# lm-eval's prompt format of each public schema a bundled task follows, keyed by the function that
# reads the schema's rows (the task registry already says which schema each task has).
SCHEMA_FORMATS: dict = {
    arc_item: {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
               "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
               "metric_list": _metrics("acc", "acc_norm")},
    boolq_item: {"output_type": "multiple_choice", "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                 "doc_to_target": "{{1 if answer else 0}}", "doc_to_choice": ["no", "yes"],
                 "metric_list": _metrics("acc")},
    lambada_item: {"output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                   "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                   "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                   *_metrics("acc")]},
    piqa_item: {"output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:",
                "doc_to_target": "{{label}}", "doc_to_choice": "{{[sol1, sol2]}}",
                "metric_list": _metrics("acc", "acc_norm")},
    openbookqa_item: {"output_type": "multiple_choice", "doc_to_text": "{{question_stem}}",
                      "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                      "doc_to_choice": "{{choices.text}}", "metric_list": _metrics("acc", "acc_norm")},
}


def suite_task_configs(suite_dir: Path = SUITE_DIR) -> dict[str, dict]:
    """lm-eval task configs for the bundled suites (know_* and world_*), in their schemas' formats."""
    def data(name: str) -> dict:
        return {"dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str((suite_dir / f"{name}.jsonl").resolve())}}}

    return {name: {"task": name, **data(name), **SCHEMA_FORMATS[task.to_item]}
            for name, task in TASKS.items() if task.bundled}


def write_suite_tasks(directory: str | Path, suite_dir: Path = SUITE_DIR) -> Path:
    """Write know_*.yaml and world_*.yaml into `directory` for --include_path / TaskManager(include_path=...).

    The files are JSON, which is valid YAML, so no YAML writer is needed."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, cfg in suite_task_configs(suite_dir).items():
        (d / f"{name}.yaml").write_text(json.dumps({**cfg, "metadata": {"version": 1.0}}, indent=2))
    return d


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with `unmask` registered, the suite tasks included and a sane batch size.

    The suite's task files go to a temporary directory that is removed when lm-eval returns."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--batch_size", "-b") or a.startswith("--batch_size=") for a in argv):
        argv += ["--batch_size", str(DEFAULT_BATCH_SIZE)]
    with tempfile.TemporaryDirectory(prefix="unmask_lm_eval_tasks_") as tasks:
        if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            argv += ["--include_path", str(write_suite_tasks(tasks))]
        sys.argv = [sys.argv[0], *argv]
        cli_evaluate()


if __name__ == "__main__":
    main()
