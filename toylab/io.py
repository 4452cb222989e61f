"""Atomic file writes and safe loading: a file is either whole or absent, never half-written.

Files get the permissions of an ordinary `open` (0666 less the umask). An operating-system error
while writing (a directory in the way, a file where a folder should be, no permission, a full disk)
becomes a one-line ToylabError naming the path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toylab.errors import ToylabError

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
"""The process's umask, read once at import (reading it means setting it, which is not thread-safe)."""


def _reason(error: OSError, path: Path) -> str:
    """Why writing `path` failed, in words a user can act on."""
    if error.errno in (errno.ENOTDIR, errno.EEXIST) or (error.errno == errno.ENOENT and not path.parent.is_dir()):
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    if error.errno == errno.EISDIR or path.is_dir():
        return "it is a folder; give a file name"
    return error.strerror or str(error)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a one-line ToylabError naming it and the reason."""
    try:
        yield
    except OSError as error:
        raise ToylabError(f"cannot write {path}: {_reason(error, Path(path))}") from None


def check_writable(path: Path) -> None:
    """Refuse an output `path` that is a folder or a special file (a device, a FIFO): a rename would replace it."""
    path = Path(path)
    if str(path) in ("", "."):
        raise ToylabError("the output path is empty; give a file name")
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # absent (or unreachable: writing will say why)
    if stat.S_ISDIR(mode):
        raise ToylabError(f"cannot write {path}: it is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise ToylabError(f"cannot write {path}: it is not a regular file (a device or a pipe)")


def below(root: Path, *parts: str) -> Path:
    """`root/parts...`, refused (one-line ToylabError) where a symbolic link along it leads out of `root`, so that
    nothing written below a run's directory lands elsewhere (`root` itself may be a link the user gave)."""
    path = Path(root).joinpath(*parts)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ToylabError(f"refusing to write {path}: a symbolic link there leads out of {root}")
    return path


def regular(path: Path) -> Path:
    """`path`, refused (one-line ToylabError) unless it is a regular file: reading a FIFO or a device could block forever."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise ToylabError(f"file not found: {path}") from None
    except OSError as error:
        raise ToylabError(f"cannot read {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise ToylabError(f"cannot read {path}: it is not a regular file")
    return Path(path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    check_writable(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600
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
        return json.loads(regular(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ToylabError(f"corrupt JSON file {path}: {error}") from None
    except OSError as error:
        raise ToylabError(f"cannot read {path}: {error.strerror or error}") from None


def sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    return hashlib.sha256(regular(path).read_bytes()).hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save a state dict as safetensors, atomically; a write that fails (a full disk) is a one-line ToylabError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    check_writable(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
            os.chmod(tmp, 0o666 & ~UMASK)  # safetensors makes 0600
            os.replace(tmp, path)
        except SafetensorError as error:  # its I/O errors are not OSErrors: "Error while serializing: I/O error: <why>"
            tmp.unlink(missing_ok=True)
            raise ToylabError(f"cannot write {path}: {str(error).split('I/O error: ')[-1]}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict (no pickle), with a one-line error for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ToylabError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ToylabError(f"corrupt checkpoint {path}: {error}") from None
