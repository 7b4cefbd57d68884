"""Durable folder writes and integrity checks: a checkpoint is the previous one or the complete new one, never
half-written, and a damaged one is recognised before it is loaded.

- :func:`atomic_folder` writes into a temporary sibling, writes a manifest (``MANIFEST.json``: every file's size,
  and the SHA-256 of files up to :data:`HASH_LIMIT`), fsyncs the files and the folder, then renames it into place.
- :func:`verify_folder` checks a folder against its manifest and checks every ``*.safetensors`` file's structure
  (header and data length), so a truncated or bit-flipped file is found without loading a model.
- :func:`check_model_folder` is the check run before a Hugging Face folder is loaded (``model.path``, checkpoints,
  the cold-start cache): each problem is a :class:`~pgzoo.ConfigError` that names it and the fix.
- :func:`clean_stale` removes what a killed write leaves behind (``.NAME.tmp.*``), restoring a folder that was
  moved aside when the kill came between the two renames of a replacement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pgzoo.errors import ConfigError

MANIFEST = "MANIFEST.json"
# Files up to this size are hashed (config, tokenizer, trainer state, small models); larger weight files are checked
# by size and safetensors structure, so a 60 GB checkpoint is not read back in full at every save and resume.
HASH_LIMIT = 256 * 2**20
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Write ``MANIFEST.json`` describing every file below ``folder`` (sizes, and hashes of the small ones)."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry = {"size": f.stat().st_size}
        if entry["size"] <= HASH_LIMIT:
            entry["sha256"] = _sha256(f)
        files[f.relative_to(folder).as_posix()] = entry
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n")


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a structurally complete safetensors file, or None. Reads the header only: 8 bytes of
    header length, a JSON header whose tensors' data offsets must end exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                return f"{path.name} is truncated (header of {n} bytes in a {size}-byte file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        return f"{path.name} has a corrupt header ({exc})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{path.name} is truncated or padded ({size} bytes, the header describes {expected})"
    return None


def verify_folder(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is damaged, or None when it matches its manifest (if it has one) and its safetensors files are
    complete. A folder without a manifest (written by another tool) is checked for safetensors structure only."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST} is corrupt ({exc})"
        for name, entry in files.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != entry.get("size"):
                return f"{name} has {f.stat().st_size} bytes, the manifest says {entry.get('size')}"
            if "sha256" in entry and _sha256(f) != entry["sha256"]:
                return f"{name} does not match its checksum"
    for f in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None


def check_model_folder(path: str | os.PathLike, key: str = "model.path") -> Path:
    """Check that ``path`` is a loadable Hugging Face model folder; returns it as a Path.

    Raises :class:`~pgzoo.ConfigError` naming ``key`` and the fix for: a missing path, a file, a folder without
    ``config.json`` (an empty folder, a wrong level), a ``config.json`` that is not a JSON object with
    ``model_type``, a folder without weights, and weights that are truncated or do not match the manifest.
    """
    p = Path(os.path.expanduser(str(path)))
    fix = f"pass the folder that holds config.json and the weights as {key}=/path/to/model"
    if not p.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist; {fix}")
    if not p.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a file, not a folder; {fix}")
    config = p / "config.json"
    if not config.is_file():
        inner = sorted(q.parent.name for q in p.glob("*/config.json"))
        hint = f" (its sub-folder {inner[0]!r} has one)" if inner else (" (the folder is empty)" if not any(p.iterdir())
                                                                          else "")
        raise ConfigError(f"{key}={str(path)!r} has no config.json{hint}; {fix}")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}={str(path)!r}: config.json is not valid JSON ({exc}); restore it from the "
                          f"original checkpoint") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ConfigError(f"{key}={str(path)!r}: config.json is not a Hugging Face model config (no model_type); "
                          f"restore it from the original checkpoint")
    if not any(f for pattern in WEIGHT_PATTERNS for f in p.glob(pattern)):
        raise ConfigError(f"{key}={str(path)!r} has no weights (*.safetensors or pytorch_model*.bin); {fix}")
    problem = verify_folder(p)
    if problem:
        raise ConfigError(f"{key}={str(path)!r} is corrupt: {problem}; restore or re-create the checkpoint")
    return p


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders a killed :func:`atomic_folder` left in ``parent``; returns what was removed.

    A kill between the two renames of a replacement leaves the target missing and the previous version in
    ``.NAME.old.*/previous``: that version is put back before the leftovers are removed.
    """
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for old in sorted(parent.glob(".*.old.*")):
        name = old.name[1:].split(".old.", 1)[0]
        if (old / "previous").is_dir() and not (parent / name).exists():
            os.replace(old / "previous", parent / name)
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    for tmp in sorted(parent.glob(".*.tmp.*")):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, manifest: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``path``; on success it replaces ``path`` (``os.replace``), on any error
    it is removed and ``path`` is left as it was.

    Before the rename the folder gets its ``MANIFEST.json`` (``manifest=True``) and every file and the folder are
    fsynced, so a power loss after the rename cannot leave a folder whose name says complete but whose data is not.

    Example:
        >>> with atomic_folder("runs/x/checkpoints/step-000010") as tmp:
        ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        for f in tmp.rglob("*"):
            _fsync(f)
        _fsync(tmp)
        if path.exists():
            # Two renames: the old folder moves aside first, so a crash between them leaves the new one complete
            # (and clean_stale puts the old one back if the crash came before the second rename).
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
