"""Reading and writing checkpoints in the public LLaDA layouts, from local files only.

A checkpoint directory holds config.json and one `model.safetensors` or shards listed in
`model.safetensors.index.json` (plus tokenizer files). The model is built on the meta device, every
tensor's shape is checked against the safetensors headers, and only then is memory allocated and
each tensor copied straight into its (fused) parameter, so weights are never held twice.

Anything wrong with the files is a `CheckpointError` naming the file and what to change.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .layouts import placements
from .parallel import parallelize, shard_pieces
from .placement import resolve_dtype
from .quantize import check_quantize, quantize_model
from .slices import SliceReader
from .transformer import MaskedDiffusionLM

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "model"
# A training run directory (see unmask.train.checkpoint, which this module must not import): `latest`
# names the newest step directory, which is complete once its manifest is written.
LATEST, MANIFEST = "latest", "manifest.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used; the message says what to change."""


def resolve_checkpoint_dir(path: str | os.PathLike | None) -> Path:
    """The checkpoint directory `path` stands for.

    None is the bundled default model; a training run directory (one with `latest`) is the checkpoint
    that `latest` names; an "owner/name" that is not a local path is that hub model's snapshot in the
    local Hugging Face cache.
    """
    if path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise CheckpointError(f"the bundled default model is not installed at {DEFAULT_MODEL_DIR}; "
                                  "pass a checkpoint directory (--model DIR)")
        return DEFAULT_MODEL_DIR
    p = Path(path).expanduser()
    if os.path.isfile(p):
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory that contains it ({p.parent})")
    if not os.path.isdir(p):
        if _HUB_ID.fullmatch(str(path)):
            return _cached_snapshot(str(path))
        raise CheckpointError(f"model directory {p} does not exist (pass a local checkpoint directory; "
                              "unmask never downloads)")
    _readable(p)
    return _latest_checkpoint(p) if os.path.lexists(p / LATEST) else p


def _latest_checkpoint(run: Path) -> Path:
    """The step directory a training run's `latest` names, which must be complete (have its manifest).

    The manifest's hashes are not checked here (that reads every byte; `unmask train --resume` does it).
    """
    pointer = run / LATEST
    data = _read_bytes(pointer)
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not (name.isprintable() and Path(name).name == name and name not in ("", ".", "..")):
        what = "is empty" if not data.strip() else f"holds {data[:40]!r}, not a directory name"
        raise CheckpointError(f"{pointer} {what}; write the name of the run's newest step directory into it "
                              "(e.g. step-000100), or pass that directory itself")
    ckpt = run / name
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{pointer} names {name}, which is not a directory in {run}; "
                              "pass an existing step directory instead")
    if not os.path.isfile(ckpt / MANIFEST):
        raise CheckpointError(f"{ckpt} has no {MANIFEST}, so it is not a complete checkpoint; "
                              "pass an older step directory of the run instead")
    read_json(ckpt / MANIFEST)
    return ckpt


def _cached_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot of `repo_id` (its main revision); never downloads."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # not cached, an incomplete snapshot, or not a valid repo id
        raise CheckpointError(
            f"{repo_id} is not a local directory and is not in the Hugging Face cache "
            f"(HF_HUB_CACHE={constants.HF_HUB_CACHE}); unmask never downloads: download it yourself and "
            f"pass the directory, e.g. unmask.load('/path/to/{repo_id.split('/')[-1]}')") from None


def _readable(path: Path) -> None:
    """Refuse a file or directory this process may not read (safetensors would call it missing)."""
    if os.path.exists(path) and not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
        raise CheckpointError(f"{path} is not readable (permission denied); fix its permissions, "
                              f"e.g. chmod -R a+rX {path}")


def _read_bytes(path: Path) -> bytes:
    _readable(path)
    try:
        return path.read_bytes()
    except OSError as e:  # missing, or a directory
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; CheckpointError naming the file if unreadable, invalid or not an object."""
    try:
        value = json.loads(_read_bytes(path))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object {{...}}, not {json.dumps(value)[:40]}")
    return value


# config.json's counts of things that each own tensors of their own (layers, experts), per layout.
COUNT_KEYS = ("n_layers", "num_hidden_layers", "num_experts")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def load_config(path: str | os.PathLike | None) -> ModelConfig:
    """The checkpoint's config, checked first against its weights' headers where it has weights."""
    d = resolve_checkpoint_dir(path)
    cfg_file = d / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file} is missing: a checkpoint directory needs config.json")
    raw = read_json(cfg_file)
    _check_counts(raw, cfg_file, d)
    try:
        return ModelConfig.from_hf_dict(raw)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def _check_counts(raw: dict, cfg_file: Path, d: Path) -> None:
    """Refuse a layer or expert count larger than the number of tensors the weights hold (each
    layer and each expert has tensors of its own), before the config builds per-layer tables: a
    config.json saying n_layers = 10**9 would otherwise take minutes and gigabytes to refuse.
    Reads only the safetensors headers."""
    index, single = d / "model.safetensors.index.json", d / "model.safetensors"
    counts = {key: raw[key] for key in COUNT_KEYS if type(raw.get(key)) is int}
    if not counts or not (index.exists() or single.exists()):
        return
    weights, tensors = index if index.exists() else single, len(_weight_files(d))
    for key, value in counts.items():
        if value > tensors:
            raise CheckpointError(f"{cfg_file}: {key} is {value}, but {weights} holds only {tensors} tensors "
                                  "(does config.json match the weights?)")


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the safetensors header alone (no tensor data is loaded).
    Every tensor must be floating point: an integer one would be cast into a weight silently."""
    _readable(file)
    try:
        with safe_open(file, framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
            dtypes = {name: s.get_dtype() for name, s in slices.items()}
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise CheckpointError(f"{file} is unreadable (truncated or corrupt?): {e}") from None
    wrong = sorted(name for name, dtype in dtypes.items() if dtype not in FLOAT_DTYPES)
    if wrong:
        raise CheckpointError(f"{file}: {wrong[0]} holds {dtypes[wrong[0]]} values, not floating point "
                              f"({len(wrong)} such tensor(s)); weights must be F32, F16 or BF16")
    return shapes


def _weight_files(d: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Map each tensor name to the safetensors file holding it and its shape there."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f'{index} needs a "weight_map" object mapping each tensor name to its shard file')
        missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shard(s) missing from {d}: {', '.join(missing)}")
        shards = {f: _shapes(d / f) for f in set(weight_map.values())}
        absent = [(name, f) for name, f in weight_map.items() if name not in shards[f]]
        if absent:
            raise CheckpointError(f"{index} places {absent[0][0]} in {absent[0][1]}, which does not hold it")
        return {name: (d / f, shards[f][name]) for name, f in weight_map.items()}
    single = d / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{d} has no model.safetensors or model.safetensors.index.json "
                              "(convert .bin checkpoints to safetensors first)")
    return {name: (single, shape) for name, shape in _shapes(single).items()}


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, trust_remote_code: bool = False,
               quantize: str | None = None, adapter: str | os.PathLike | None = None,
               mesh=None, expert_parallel: bool = False) -> torch.nn.Module:
    """Load a checkpoint (see `resolve_checkpoint_dir` for what `path` may be) in eval mode.

    dtype defaults to float32 on the CPU and bfloat16 elsewhere. With trust_remote_code=True an
    architecture unmask does not know is loaded through transformers with the checkpoint's own code.
    adapter=DIR merges that LoRA adapter (or LoRA training run) into the weights (`adapters.merge_adapter`);
    with path None the base is the checkpoint the adapter records (`base_checkpoint`).
    quantize="int8" converts the linear weights to 8 bits after the load (`quantize.quantize_model`).
    With a 1-D DeviceMesh the model is sharded for tensor parallelism (`parallel.parallelize`) before
    any memory is allocated, and each rank reads only its own slices of the safetensors files (with
    an adapter, each rank loads the whole model, merges the adapter, then keeps its shard).
    expert_parallel=True splits an MoE model's routed experts whole over the mesh's ranks instead
    of by width (`parallel.ExpertParallel`): each rank then reads only its own experts' bytes.
    """
    check_quantize(quantize)   # before anything is read: a bad value or a missing torchao is one line
    if expert_parallel and mesh is None:
        raise ValueError("expert_parallel=True splits the experts over a mesh's ranks: pass mesh= too")
    if quantize is not None and trust_remote_code:
        raise ValueError(f"quantize={quantize!r} works on unmask's own models, not with trust_remote_code")
    if adapter is not None and trust_remote_code:
        raise ValueError("a LoRA adapter applies to unmask's own models, not with trust_remote_code")
    device = torch.device(device or "cpu")
    dtype = resolve_dtype(dtype) or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    d = resolve_checkpoint_dir(base_checkpoint(path, adapter))
    try:
        cfg = load_config(d)
    except CheckpointError:
        if (d / "adapter_config.json").is_file() and not (d / "config.json").is_file():
            raise CheckpointError(f"{d} is a LoRA adapter, not a model: pass it as the adapter "
                                  "(--adapter DIR), with its base model as --model") from None
        if not trust_remote_code:
            raise
        return _load_remote_code(d, dtype, device)
    files = _weight_files(d)
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
    with torch.device("meta"):
        model = MaskedDiffusionLM(cfg)
    for p in table:  # before allocating: a wrong config.json must not ask for hundreds of GB first
        file, found = files[p.checkpoint_name]
        implied = tuple(_tensor(model, p.param_name)[p.index].shape)
        if found != implied:
            raise CheckpointError(f"{file}: {p.checkpoint_name} has shape {found}, {d / 'config.json'} implies "
                                  f"{implied} (does config.json match the weights?)")
    model = model.to(dtype)
    if mesh is not None and quantize is not None:
        raise ValueError(f"quantize={quantize!r} does not combine with tensor parallelism yet")
    shard_now = mesh if adapter is None else None   # an adapter merges into whole weights: shard after it
    if shard_now is not None:
        parallelize(model, shard_now, expert_parallel)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    by_file: dict[Path, list] = {}
    for p in table:
        by_file.setdefault(files[p.checkpoint_name][0], []).append(p)
    with torch.no_grad():
        for file, group in by_file.items():
            try:
                with safe_open(file, framework="pt", device=str(device)) as f, SliceReader(file) as slices:
                    for p in group:
                        for dest, source in shard_pieces(model, p.param_name, p.index, shard_now):
                            if source is None:
                                dest.copy_(f.get_tensor(p.checkpoint_name))
                            else:   # a tensor-parallel rank's rows, read without mapping the rest
                                slices.read_into(p.checkpoint_name, dest, *source)
            except Exception as e:
                raise CheckpointError(f"{file} is unreadable (truncated or corrupt?): {e}") from None
            _check_finite(model, group, file, shard_now)
    if adapter is not None:
        from .adapters import merge_adapter

        model = merge_adapter(model, adapter)
        if mesh is not None:   # merged into whole weights: sharded only now
            parallelize(model, mesh, expert_parallel)
    return quantize_model(model.eval(), quantize)


def base_checkpoint(path: str | os.PathLike | None, adapter: str | os.PathLike | None) -> str | os.PathLike | None:
    """The base model to load: `path`, or when it is None and an adapter is given, the base that
    adapter records (a LoRA training run records its --init-from), else None (the bundled model)."""
    if path is not None or adapter is None:
        return path
    from .adapters import adapter_base

    return adapter_base(adapter)


def _check_finite(model: torch.nn.Module, group: list, file: Path, mesh) -> None:
    """Refuse NaN or infinite weights (as loaded, in the load's dtype), which would make every
    output NaN without an error. A tensor-parallel rank checks its own slices."""
    for p in group:
        if not all(_all_finite(dest) for dest, _ in shard_pieces(model, p.param_name, p.index, mesh)):
            raise CheckpointError(f"{file}: {p.checkpoint_name} holds NaN or infinite values (a diverged or "
                                  "damaged checkpoint, or one too large for this dtype)")


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, checked 2**18 values at a time: `isfinite`'s temporaries
    on a whole embedding table would cost a third of its size again at the load's peak."""
    if t.dim() == 0:
        return bool(torch.isfinite(t))
    rows = max(1, 2**18 // max(1, t[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


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
    d = resolve_checkpoint_dir(path)
    files = [d / f for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model") if (d / f).exists()]
    if not files:
        raise CheckpointError(f"{d} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    for f in files:
        _readable(f)
    if (d / "tokenizer_config.json").exists():
        read_json(d / "tokenizer_config.json")  # transformers' errors for a damaged one would not name it
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # AutoTokenizer warns that config.json's model_type is not a transformers one
    try:
        with warnings.catch_warnings():   # and about config keys (rope_scaling: null) that do not concern a tokenizer
            warnings.simplefilter("ignore", FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        if (d / "tokenizer.json").exists():
            read_json(d / "tokenizer.json")  # only now: it is large; when it is the culprit, name it
        raise CheckpointError(f"{d}: the tokenizer files cannot be loaded ({type(e).__name__}: {e})") from None
    finally:
        logging.set_verbosity(level)
    _check_chat_template(tokenizer, d)
    return tokenizer


def _check_chat_template(tokenizer, d: Path) -> None:
    """Compile the chat template now, so a broken one is reported at load time naming its file.

    Otherwise jinja2 raises TemplateSyntaxError at the first chat, deep inside generation or a request.
    """
    if not tokenizer.chat_template:
        return
    from jinja2 import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    except TemplateSyntaxError as e:
        source = next((f for f in (d / "chat_template.jinja", d / "tokenizer_config.json") if f.exists()), d)
        raise CheckpointError(f"{source}: the chat template is not valid Jinja ({e.message}, line {e.lineno}); "
                              "fix or remove it") from None
    except Exception:
        pass  # it compiled; the template merely refuses this one-message probe (e.g. it wants a system turn)
