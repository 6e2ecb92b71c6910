"""Reading and writing checkpoints in the public LLaDA layouts, from local directories only.

A checkpoint directory holds config.json and one `model.safetensors` or shards listed in
`model.safetensors.index.json` (plus tokenizer files). The model is built on the meta device and
each tensor is copied straight into its (fused) parameter, so weights are never held twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .layouts import placements
from .transformer import MaskedDiffusionLM

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "model"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used; the message says what to change."""


def resolve_model_dir(path: str | os.PathLike | None) -> Path:
    """The directory to load: `path`, or the bundled default model when `path` is None."""
    if path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise CheckpointError(f"the bundled default model is not installed at {DEFAULT_MODEL_DIR}; "
                                  "pass a checkpoint directory (--model DIR)")
        return DEFAULT_MODEL_DIR
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"model directory {p} does not exist (pass a local checkpoint directory; "
                              "unmask never downloads)")
    return p


def load_config(path: str | os.PathLike | None) -> ModelConfig:
    d = resolve_model_dir(path)
    cfg_file = d / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file} is missing: a checkpoint directory needs config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf_dict(raw)
    except (KeyError, ValueError) as e:
        msg = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{cfg_file}: {msg}") from None


def _weight_files(d: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (d / f).exists()})
        if missing:
            raise CheckpointError(f"{d}: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return {name: d / f for name, f in weight_map.items()}
    single = d / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{d} has no model.safetensors or model.safetensors.index.json "
                              "(convert .bin checkpoints to safetensors first)")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise CheckpointError(f"{single} is unreadable (truncated or corrupt?): {e}") from None


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a checkpoint directory (None: the bundled default model) in eval mode.

    dtype defaults to float32 on the CPU and bfloat16 elsewhere. With trust_remote_code=True an
    architecture unmask does not know is loaded through transformers with the checkpoint's own code.
    """
    device = torch.device(device or "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    d = resolve_model_dir(path)
    try:
        cfg = load_config(d)
    except CheckpointError:
        if not trust_remote_code:
            raise
        return _load_remote_code(d, dtype, device)
    files = _weight_files(d)
    with torch.device("meta"):
        model = MaskedDiffusionLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    table = placements(cfg)
    expected = {p.checkpoint_name for p in table}
    missing = sorted(expected - files.keys())
    if missing:
        raise CheckpointError(f"{d}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]} "
                              "(does config.json match the weights?)")
    unknown = sorted(n for n in files.keys() - expected if not n.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise CheckpointError(f"{d}: the checkpoint has tensor(s) this config does not use, e.g. {unknown[:3]} "
                              "(does config.json match the weights?)")
    by_file: dict[Path, list] = {}
    for p in table:
        by_file.setdefault(files[p.checkpoint_name], []).append(p)
    with torch.no_grad():
        for file, group in by_file.items():
            try:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for p in group:
                        target = _tensor(model, p.param_name)[p.index]
                        source = f.get_tensor(p.checkpoint_name)
                        if source.shape != target.shape:
                            raise CheckpointError(f"{file}: {p.checkpoint_name} has shape {tuple(source.shape)}, "
                                                  f"config.json implies {tuple(target.shape)}")
                        target.copy_(source)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{file} is unreadable (truncated or corrupt?): {e}") from None
    return model.eval()


def _load_remote_code(d: Path, dtype, device) -> torch.nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(d, trust_remote_code=True, local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def save_model(model: MaskedDiffusionLM, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write config.json and model.safetensors in the model's public layout.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {}
    for p in placements(cfg):
        t = _tensor(model, p.param_name).detach()[p.index]
        tensors[p.checkpoint_name] = (t.to(dtype) if dtype else t).contiguous().cpu()
    _atomic_write(d / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(d / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_hf_dict(), indent=2)))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_tokenizer(path: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The checkpoint's Hugging Face tokenizer (tokenizer.json / tokenizer_config.json), offline."""
    d = resolve_model_dir(path)
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CheckpointError(f"{d} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # AutoTokenizer warns that config.json's model_type is not a transformers one
    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=trust_remote_code)
    finally:
        logging.set_verbosity(level)
