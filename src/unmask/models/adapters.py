"""LoRA adapters on unmask's models, through `peft`: which matrices they adapt, and loading one.

An adapter directory is peft's own format (adapter_config.json + adapter_model.safetensors), so
peft reads what unmask writes and the other way round. Loading an adapter for inference merges it
into the base weights (W + alpha/r · B·A): what comes back is a plain MaskedDiffusionLM, so every
path that takes a model (samplers, KV caches, CUDA graphs, int8 weights, the server) works on it
unchanged and runs at the base model's speed. `load_model(..., adapter=DIR)` is the one place
that does it; every entry point goes through it.

A server holding several adapters keeps them unmerged instead (`AdapterSet`): one base in
memory, each adapter's A and B beside it, one adapter active per forward pass.

Module names are unmask's fused ones: `qkv` (q|k|v in one matrix), `out`, `gate_up`, `down`; the
routed experts of the MoE layouts are stacked 3-D parameters `w_gate`, `w_up`, `w_down`, which
peft adapts with one rank-r update per expert (its `target_parameters`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .config import ModelConfig
from .loading import CheckpointError, read_json, resolve_checkpoint_dir

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MODULE_TARGETS = ("qkv", "out", "gate_up", "down", "router", "lm_head")   # nn.Linear modules
EXPERT_TARGETS = ("w_gate", "w_up", "w_down")                             # stacked expert weights
_FILE_PREFIX, _NAME = "base_model.model.", "default"                      # peft's names in the file
INSTALL_HINT = 'pip install "unmask[lora]" (or pip install peft)'


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError(f"LoRA adapters need peft, which is not installed: {INSTALL_HINT}") from None
    return peft


def default_targets(cfg: ModelConfig) -> list[str]:
    """Every linear layer of attention and of the MLPs: q|k|v and the output projection, and the
    dense SwiGLU's and shared experts' `gate_up`/`down` (on every layout the same names).

    Not the routed experts: peft adapts a stacked 3-D parameter by materialising W + ΔW in every
    forward pass, which autograd keeps, so it holds a second copy of every MoE layer's experts
    (3·E·H·D values per layer; docs/lora.md) and LoRA would lose its memory advantage; ask for
    them with targets w_gate, w_up, w_down (best with activation checkpointing, which keeps one
    layer's copy at a time). Not the router (re-routing tokens changes which experts see what),
    the embeddings or the output head (vocabulary-sized; SFT keeps the vocabulary).
    """
    return ["qkv", "out", "gate_up", "down"]


def lora_config(cfg: ModelConfig, rank: int, alpha: float, targets: list[str] | None = None,
                base: str | None = None):
    """peft's LoraConfig for a model of `cfg`: `targets` (default `default_targets`) checked against
    what this layout has; `base` is the base checkpoint written into the adapter's config."""
    if rank < 1:
        raise ValueError(f"lora_rank must be at least 1, not {rank}")
    if not alpha > 0:
        raise ValueError(f"lora_alpha must be > 0, not {alpha}")
    targets = list(targets) if targets else default_targets(cfg)
    unknown = [t for t in targets if t not in MODULE_TARGETS + EXPERT_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(MODULE_TARGETS + EXPERT_TARGETS)}")
    absent = [t for t in targets if (t in EXPERT_TARGETS or t == "router") and not cfg.n_experts]
    if absent:
        raise ValueError(f"LoRA target(s) {', '.join(absent)} exist only in MoE models; "
                         f"this {cfg.layout} model is dense")
    if "lm_head" in targets and cfg.tie_embeddings:
        raise ValueError("lm_head is tied to the embeddings in this model; leave it out of the LoRA targets")
    return _peft().LoraConfig(r=rank, lora_alpha=alpha, base_model_name_or_path=base,
                              target_modules=[t for t in targets if t in MODULE_TARGETS],
                              target_parameters=[t for t in targets if t in EXPERT_TARGETS])


def add_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """Insert LoRA layers into `model` in place (it stays the same object, now with `lora_A`/`lora_B`
    modules) and freeze everything else; returns peft's wrapper around it (for merging)."""
    base = config.base_model_name_or_path
    with warnings.catch_warnings():  # peft overwrites the base with the model's name_or_path, which it lacks,
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")  # and warns; it is put back
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")  # merging a quantized
        # base in place is not needed: the adapter is merged into the float base at load
        wrapped = _peft().get_peft_model(model, config)
    config.base_model_name_or_path = base
    return wrapped


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a model's state dict, under the names peft writes in adapter_model.safetensors."""
    return {_FILE_PREFIX + k.replace(f".{_NAME}.", "."): v for k, v in state.items() if ".lora_" in k}


def model_tensors(tensors: dict[str, torch.Tensor], name: str = _NAME) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors' tensors under the model's state-dict names (the inverse of
    `adapter_tensors`), for the adapter loaded as `name`."""
    out = {}
    for k, v in tensors.items():
        head, _, tail = k.removeprefix(_FILE_PREFIX).rpartition(".")
        out[f"{head}.{name}.{tail}"] = v
    return out


def _adapter_name(state_name: str) -> str:
    """Which adapter a LoRA tensor of the model's state dict belongs to (`...lora_A.NAME.weight`)."""
    return state_name.split(".lora_", 1)[1].split(".")[1]


def save_adapter(config, tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Write an adapter directory: `config` (a LoraConfig) and `tensors` (named as `adapter_tensors` names them)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(d)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, d / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter directory `path` stands for: an adapter directory, or a LoRA training run (its `latest`)."""
    d = resolve_checkpoint_dir(path)
    if not (d / ADAPTER_CONFIG).is_file():
        hint = " (it is a full checkpoint: pass it as --model)" if (d / "config.json").is_file() else ""
        raise CheckpointError(f"{d} has no {ADAPTER_CONFIG}, so it is not a LoRA adapter{hint}")
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{d} has no {ADAPTER_WEIGHTS}; an adapter directory needs both "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    return d


def adapter_base(adapter: str | os.PathLike) -> str | None:
    """The base checkpoint an adapter records (its config's base_model_name_or_path), or None."""
    base = read_json(resolve_adapter_dir(adapter) / ADAPTER_CONFIG).get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def check_adapter_names(model: torch.nn.Module, names, source: Path, fix: str, name: str = _NAME) -> None:
    """Refuse an adapter whose tensors (model-state names) are not exactly the LoRA tensors of
    `model` for the adapter loaded as `name`: peft only warns about either kind of difference, and
    the output would silently be a different model."""
    expected = {k for k in model.state_dict() if ".lora_" in k and _adapter_name(k) == name}
    extra, missing = sorted(set(names) - expected), sorted(expected - set(names))
    if extra or missing:
        example = f"it has {extra[0]}" if extra else f"it lacks {missing[0]}"
        raise CheckpointError(f"{source} adapts other matrices than this model has ({example}); {fix}")


def attach_adapter(model: torch.nn.Module, adapter: str | os.PathLike, into=None, name: str = _NAME):
    """peft's model with the adapter's LoRA layers beside the base weights (not merged), as adapter
    `name`; `into` is the peft model an earlier call returned for `model`, to hold one more adapter."""
    from safetensors import safe_open

    d = resolve_adapter_dir(adapter)
    fix = "pass the --model it was trained on"
    try:
        with warnings.catch_warnings():  # what peft only warns about is checked below, and refused
            warnings.simplefilter("ignore")
            if into is None:
                wrapped = _peft().PeftModel.from_pretrained(model, d, adapter_name=name)
            else:
                wrapped = into
                wrapped.load_adapter(d, adapter_name=name)
        with safe_open(d / ADAPTER_WEIGHTS, framework="pt") as f:
            names = model_tensors(dict.fromkeys(f.keys()), name)
    except (RuntimeError, ValueError, KeyError, OSError) as e:  # shapes that do not fit this base, bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{d} does not fit this base model ({first}); {fix}") from None
    check_adapter_names(model, names, d / ADAPTER_WEIGHTS, fix, name)
    return wrapped


def merge_adapter(model: torch.nn.Module, adapter: str | os.PathLike) -> torch.nn.Module:
    """`model` with the adapter merged into its weights: a plain model again, as fast as the base."""
    with torch.no_grad():
        merged = attach_adapter(model, adapter).merge_and_unload()
        _unload_nested(merged)
    return merged


def _unload_nested(model: torch.nn.Module) -> None:
    """Merge and remove the LoRA layers peft's merge_and_unload leaves behind: those inside a module
    whose own parameters are adapted too (the shared expert's linears inside an MoE whose stacked
    experts are), which peft 0.21 skips, so the saved weights would lack their update."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in reversed(list(model.named_modules())):  # children before their parents
        if isinstance(module, BaseTunerLayer):
            if not module.merged:
                module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())


class AdapterSet:
    """Several LoRA adapters held beside one base model, unmerged; one of them (or none) active.

    Why not merged: a merged adapter is W + ΔW in every adapted matrix, so n merged adapters need n
    copies of the base, and swapping updates in and out (W += ΔW, later W -= ΔW) drifts with
    rounding over a server's life. Unmerged, peft computes base(x) + alpha/r · B(A(x)) in each
    adapted layer for the active adapter only: each adapter costs its A and B (rank r), the base
    weights stay exactly as loaded, and the logits equal the merged model's within float rounding
    (tests: 1e-5). The price is the rank-r matmuls of each forward pass.

    `adapters` maps the name callers use to an adapter directory (or LoRA training run). peft's own
    names are `a0`, `a1`, ... (a module key may not hold a dot, a served name may). `activate` is not
    thread-safe: the caller runs one forward pass at a time (the server's single worker thread)."""

    def __init__(self, model: torch.nn.Module, adapters: dict[str, str | os.PathLike]):
        if not adapters:
            raise ValueError("an AdapterSet needs at least one adapter")
        _check_expert_targets(adapters)
        self.model = model
        self._peft_names = {name: f"a{i}" for i, name in enumerate(adapters)}
        wrapped = None
        with torch.no_grad():
            for name, directory in adapters.items():
                wrapped = attach_adapter(model, directory, into=wrapped, name=self._peft_names[name])
        self._tuner = wrapped.base_model
        self.active: str | None = None
        self.activate(None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._peft_names)

    def activate(self, name: str | None) -> None:
        """From now on the model computes as the base (None) or as the base with adapter `name`."""
        if name is None:
            self._tuner.disable_adapter_layers()
        elif name not in self._peft_names:
            raise KeyError(f"no adapter named {name!r}; the adapters are {', '.join(self.names)}")
        else:
            self._tuner.enable_adapter_layers()
            self._tuner.set_adapter(self._peft_names[name], inference_mode=True)
        self.active = name


def _check_expert_targets(adapters: dict[str, str | os.PathLike]) -> None:
    """peft holds several adapters on stacked expert weights only when they all adapt the same ones."""
    seen = {}
    for name, directory in adapters.items():
        targets = read_json(resolve_adapter_dir(directory) / ADAPTER_CONFIG).get("target_parameters") or []
        seen[name] = tuple(sorted(targets))
    if any(seen.values()) and len(set(seen.values())) > 1:
        listed = "; ".join(f"{n}: {', '.join(t) or 'none'}" for n, t in seen.items())
        raise ValueError(f"adapters held together must adapt the same routed-expert weights (peft's limit), "
                         f"these differ ({listed}); merge one with unmask merge and serve it alone")
