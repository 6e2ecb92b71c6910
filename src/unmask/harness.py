"""lm-evaluation-harness adapter: `--model unmask`, with unsupervised CFG in scoring and sampling.

    python -m unmask.harness --model unmask \\
        --model_args model=DIR,cfg_scale=0.5,mc_num=128 --tasks world_mc,world_boolq

lm-eval has no plugin entry point, so this module registers the model and then runs lm-eval's own
command line (the pattern of LLaDA's and Dream's adapters). It also writes lm-eval task YAMLs
for the bundled world suite (with absolute paths to the shipped JSONL files) and passes their
directory as --include_path unless you give one: then call `write_suite_tasks(DIR)` yourself.
Everything stays offline: the hub is switched off before lm-eval (and so `datasets`) is imported.

Model args: model (checkpoint dir; default the bundled model), cfg_scale, mc_num, mode ("mc" |
"chain"), check_greedy, steps, gen_length, block_length, remasking, device, dtype, seed. lm-eval's
--batch_size is the number of rows per forward pass (doubled under CFG); `python -m
unmask.harness` uses 32 when it is not given (lm-eval's default of 1 would be slow).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402

from .eval.encoding import encode, encode_pair  # noqa: E402
from .eval.tasks import SUITE_DIR  # noqa: E402
from .likelihood import Request, document_bound, greedy_check, score_requests  # noqa: E402
from .models import load_model, load_tokenizer  # noqa: E402
from .sampling import block_length_for, generate  # noqa: E402
from .sampling.generate import context_length  # noqa: E402

DEFAULT_BATCH_SIZE = 32


@register_model("unmask")
class UnmaskLM(LM):
    """A masked diffusion LM behind lm-eval's three request types.

    loglikelihood -> the bound of unmask.likelihood at `cfg_scale` (is_greedy from the sampler at
    temperature 0, one token per step, when check_greedy); loglikelihood_rolling -> document_bound;
    generate_until -> the sampler, cut at the first stop string and at max_gen_toks.
    """

    def __init__(self, model: str | None = None, cfg_scale: float = 0.0, mc_num: int = 128, mode: str = "mc",
                 check_greedy: bool = True, steps: int | None = None, gen_length: int = 128,
                 block_length: int | None = None, remasking: str = "low_confidence", device: str | None = None,
                 dtype: str | None = None, seed: int = 0, batch_size: int | str | None = None,
                 max_batch_size: int | None = None):  # max_batch_size: part of lm-eval's call, unused
        super().__init__()
        self.model = load_model(model, dtype=dtype, device=_available(device))
        self.tokenizer = load_tokenizer(model)
        self.cfg_scale, self.mc_num, self.mode = float(cfg_scale), int(mc_num), mode
        self.check_greedy, self.seed, self.remasking = bool(check_greedy), int(seed), remasking
        self.steps, self.gen_length, self.block_length = steps, int(gen_length), block_length
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE
        self.max_len = context_length(self.model)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    @property
    def device(self):
        return next(self.model.parameters()).device

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        out = []
        for i, inst in enumerate(tqdm(requests, desc="loglikelihood", disable=disable_tqdm or self.rank != 0)):
            context, continuation = inst.args
            ctx, cont = encode_pair(self.tokenizer, context, continuation, self.max_len)
            [[est]] = score_requests(self.model, [Request(ctx, cont, self.seed * 1_000_003 + i)],
                                     cfg_scales=[self.cfg_scale], mode=self.mode, mc_num=self.mc_num,
                                     batch_size=self.batch_size)
            greedy = self.check_greedy and greedy_check(self.model, ctx, cont, cfg_scale=self.cfg_scale)
            out.append((est.value, bool(greedy)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [document_bound(self.model, encode(self.tokenizer, inst.args[0]), cfg_scale=self.cfg_scale,
                               mode=self.mode, mc_num=self.mc_num, batch_size=self.batch_size,
                               seed=self.seed * 1_000_003 + i).value
                for i, inst in enumerate(requests)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate_one(*inst.args) for inst in requests]

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        gen_length = int(gen_kwargs.get("max_gen_toks", self.gen_length))
        block = block_length_for(gen_length, self.block_length or gen_length)
        blocks = gen_length // block
        steps = max(blocks, min(gen_length, (self.steps or gen_length) // blocks * blocks))
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
        ids = encode(self.tokenizer, context)
        if self.max_len is not None:
            ids = ids[max(0, len(ids) - (self.max_len - gen_length)):]
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        out = generate(self.model, prompt, steps=steps, gen_length=gen_length, block_length=block,
                       temperature=temperature, cfg_scale=self.cfg_scale, remasking=self.remasking,
                       generator=generator, stop_at_eos=self.model.config.eos_token_id is not None)
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


def suite_task_configs(suite_dir: Path = SUITE_DIR) -> dict[str, dict]:
    """lm-eval task configs for the bundled suite: the prompt formats of arc/boolq/lambada/piqa/openbookqa."""
    def data(name: str) -> dict:
        return {"dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str((suite_dir / f"{name}.jsonl").resolve())}}}

    return {
        "world_mc": {"task": "world_mc", **data("world_mc"), "output_type": "multiple_choice",
                     "doc_to_text": "Question: {{question}}\nAnswer:",
                     "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
                     "metric_list": _metrics("acc", "acc_norm")},
        "world_boolq": {"task": "world_boolq", **data("world_boolq"), "output_type": "multiple_choice",
                        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                        "doc_to_target": "{{1 if answer else 0}}", "doc_to_choice": ["no", "yes"],
                        "metric_list": _metrics("acc")},
        "world_cloze": {"task": "world_cloze", **data("world_cloze"), "output_type": "loglikelihood",
                        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                         "higher_is_better": False}, *_metrics("acc")]},
        "world_piqa": {"task": "world_piqa", **data("world_piqa"), "output_type": "multiple_choice",
                       "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "{{label}}",
                       "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": _metrics("acc", "acc_norm")},
        "world_obqa": {"task": "world_obqa", **data("world_obqa"), "output_type": "multiple_choice",
                       "doc_to_text": "{{question_stem}}", "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                       "doc_to_choice": "{{choices.text}}", "metric_list": _metrics("acc", "acc_norm")},
    }


def write_suite_tasks(directory: str | Path, suite_dir: Path = SUITE_DIR) -> Path:
    """Write world_*.yaml into `directory` for --include_path / TaskManager(include_path=...).

    The files are JSON, which is valid YAML, so no YAML writer is needed."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, cfg in suite_task_configs(suite_dir).items():
        (d / f"{name}.yaml").write_text(json.dumps({**cfg, "metadata": {"version": 1.0}}, indent=2))
    return d


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI with `unmask` registered, the suite tasks included and a sane batch size."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--batch_size", "-b") or a.startswith("--batch_size=") for a in argv):
        argv += ["--batch_size", str(DEFAULT_BATCH_SIZE)]
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(write_suite_tasks(tempfile.mkdtemp(prefix="unmask_lm_eval_tasks_")))]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
