"""Training checkpoints that are either whole or absent, and verified before use.

Layout of `out_dir`:
    step-000100/   config.json, model.safetensors, tokenizer files (what `load_model` /
                   `load_tokenizer` read), trainer_state.pt (optimizer, step, RNG, data position,
                   config) and manifest.json (size + sha256 of every other file, written last);
                   a LoRA run writes its adapter (adapter_config.json, adapter_model.safetensors)
                   in place of config.json and model.safetensors
    latest         the name of the newest complete checkpoint directory

A checkpoint is written into a temporary directory inside out_dir, every file fsynced, then
renamed into place, and only then is `latest` replaced (itself atomically). A crash at any moment
leaves the previous checkpoint and pointer intact. Saving a step directory that exists already
(after resuming from an older checkpoint) cannot rename over it, so `latest` first names the
sealed temporary directory, the old one is moved aside, the new one hard-linked into place, and
only then does `latest` name it: `latest` names a complete checkpoint throughout. On resume the manifest is checked first, so a
truncated or corrupted file is reported as a `CheckpointError` instead of loading half a state.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from ..models import CheckpointError
from ..models.loading import LATEST, MANIFEST, read_json, resolve_checkpoint_dir

STATE = "trainer_state.pt"
PREFIX = "step-"
# Why writing can fail that is the disk's doing, not the run's, and what to do about it.
DISK_ERRORS = {errno.ENOSPC: ("no space left on device", "free space"),
               errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
               errno.EROFS: ("read-only file system", "make it writable or copy the run to a writable disk"),
               errno.EACCES: ("permission denied", "make it writable or copy the run to a writable disk"),
               errno.EPERM: ("permission denied", "make it writable or copy the run to a writable disk")}


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
            _replace_step(out_dir, tmp, final)
        else:
            os.replace(tmp, final)
            _fsync(out_dir)
        write_text_atomic(out_dir / LATEST, final.name + "\n")
    finally:   # best effort (the disk may be full or read-only), and never what `latest` names
        if tmp.exists() and _latest_name(out_dir) != tmp.name:
            shutil.rmtree(tmp, ignore_errors=True)
    prune(out_dir, keep_last, keep=final.name)
    return final


def disk_error(e: BaseException) -> int | None:
    """The errno of a write that failed for the disk's sake (full, over quota, read-only, not
    writable), else None. The writers report it three ways: an OSError; safetensors'
    SafetensorError and torch's RuntimeError, which carry only a message ("... os error 28"), or
    for torch's zip writer (PytorchStreamWriter, "unexpected pos") no cause at all, which is taken
    as a full disk."""
    if isinstance(e, OSError):
        return e.errno if e.errno in DISK_ERRORS else None
    if not isinstance(e, (RuntimeError, SafetensorError)):
        return None
    number = re.search(r"os error (\d+)", str(e))
    if number:
        return int(number.group(1)) if int(number.group(1)) in DISK_ERRORS else None
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in str(e) or "unexpected pos" in str(e)):
        return errno.ENOSPC
    return None


def disk_error_message(e: BaseException, out_dir: Path) -> str | None:
    """One line for a disk error (`disk_error`) while training into out_dir: what happened, that the
    last complete checkpoint is intact (checkpoints are renamed into place whole), what to do."""
    code = disk_error(e)
    if code is None:
        return None
    what, fix = DISK_ERRORS[code]
    where = getattr(e, "filename", None) or out_dir
    last = _latest_name(out_dir)
    kept = f"the last complete checkpoint, {out_dir / last}, is intact" if last else "no checkpoint was written yet"
    return f"{what} while writing {where}; {kept}: {fix}, then rerun with --resume"


def _replace_step(out_dir: Path, sealed: Path, final: Path) -> None:
    """Put the sealed checkpoint at `final`, which exists, with `latest` naming a complete directory
    at every moment: a directory cannot be renamed over another, and between removing the old one
    and renaming the new one in, `latest` could name neither. So `latest` names `sealed` first, the
    old directory moves aside (under a temporary name that `prune` removes), and `sealed`'s files
    are hard-linked into a new `final` (no copying), which `write_checkpoint` then points `latest` at."""
    write_text_atomic(out_dir / LATEST, sealed.name + "\n")
    old = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".tmp-{final.name}-replaced-"))
    os.replace(final, old / final.name)
    _fsync(out_dir)
    shutil.copytree(sealed, final, copy_function=_link_or_copy)
    _fsync(final)
    _fsync(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link, or a copy (fsynced) on a file system without them."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        _fsync(Path(dst))


def _latest_name(out_dir: Path) -> str | None:
    pointer = out_dir / LATEST
    return pointer.read_text(errors="replace").strip() if pointer.is_file() else None


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
