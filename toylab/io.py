"""Atomic file writes and safe loading: a file is either whole or absent, never half-written."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toylab.errors import ToylabError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    """Read JSON, with a one-line error for a missing or corrupt file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ToylabError(f"file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ToylabError(f"corrupt JSON file {path}: {error}") from None


def sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save a state dict as safetensors, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict (no pickle), with a one-line error for a missing or corrupt file."""
    if not Path(path).is_file():
        raise ToylabError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ToylabError(f"corrupt checkpoint {path}: {error}") from None
