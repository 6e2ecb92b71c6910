"""Training checkpoints that are either whole or absent, and verified before use.

Layout of `out_dir`:
    step-000100/   config.json, model.safetensors, tokenizer files (what `load_model` /
                   `load_tokenizer` read), trainer_state.pt (optimizer, step, RNG, data position,
                   config) and manifest.json (size + sha256 of every other file, written last)
    latest         the name of the newest complete checkpoint directory

A checkpoint is written into a temporary directory inside out_dir, every file fsynced, then
renamed into place, and only then is `latest` replaced (itself atomically). A crash at any moment
leaves the previous checkpoint and pointer intact. On resume the manifest is checked first, so a
truncated or corrupted file is reported as a `CheckpointError` instead of loading half a state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..models import CheckpointError
from ..models.loading import LATEST, MANIFEST, read_json, resolve_checkpoint_dir

STATE = "trainer_state.pt"
PREFIX = "step-"


def step_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync(target.parent)


def write_checkpoint(out_dir: Path, step: int, write_files: Callable[[Path], None], keep_last: int) -> Path:
    """Call write_files(tmp_dir), seal it with a manifest, move it to out_dir/step-NNNNNN, point `latest` at it."""
    final = out_dir / step_name(step)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".tmp-{final.name}-"))
    try:
        write_files(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        for p in files:
            _fsync(p)
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming from an older checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_text_atomic(out_dir / LATEST, final.name + "\n")
    prune(out_dir, keep_last, keep=final.name)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoint directories (those with a manifest), oldest first."""
    found = [p for p in out_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: p.name)


def prune(out_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest keep_last checkpoints (never `keep`), and stale temporary dirs."""
    for stale in out_dir.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file in the manifest is present with its size and hash."""
    manifest_file = ckpt / MANIFEST
    if not manifest_file.exists():
        raise CheckpointError(f"{ckpt} has no {MANIFEST}: it is not a complete unmask training checkpoint")
    files = read_json(manifest_file).get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= e.keys()
                                              for e in files.values()):
        raise CheckpointError(f"{manifest_file} is damaged (no \"files\" object of sizes and hashes); "
                              "resume from an older checkpoint")
    for name, expect in files.items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (the checkpoint is incomplete)")
        if p.stat().st_size != expect["size"]:
            raise CheckpointError(f"{p} has {p.stat().st_size} bytes, the manifest says {expect['size']} "
                                  "(truncated?); resume from an older checkpoint")
        if _sha256(p) != expect["sha256"]:
            raise CheckpointError(f"{p} does not match its sha256 in {MANIFEST} (corrupted); "
                                  "resume from an older checkpoint")


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """The checkpoint to resume from: "auto" → what out_dir/latest names (None when there is none
    yet), else a checkpoint or run directory (resolved as `load_model` resolves it)."""
    if not resume:
        return None
    if resume != "auto":
        return resolve_checkpoint_dir(resume)
    return resolve_checkpoint_dir(out_dir) if os.path.lexists(out_dir / LATEST) else None


def load_state(ckpt: Path, verified: bool = False) -> dict:
    """trainer_state.pt of a checkpoint, after checking the manifest unless `verified`."""
    if not verified:
        verify(ckpt)
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt / STATE} is unreadable ({e})") from None
