"""Atomic writes: a file is either its old self or its complete new self, never half.

Write to a temporary file in the same folder, flush and fsync it, then os.replace it
over the target (atomic on POSIX and Windows). Torch-free, so the runtime can use it.

A write that fails (disk full, quota, I/O error, read-only folder) raises one ``WriteError``
naming the file and the free space left, and leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from fmtl.errors import WriteError

# torch.save's C++ writer reports a failed write (ENOSPC included) as a RuntimeError with these words.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container", "unexpected pos", "file write failed")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with write_errors(path), os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        with write_errors(path):
            _set_default_mode(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of ``path`` into one WriteError naming it and the free space left.

    Catches OSError (ENOSPC, EDQUOT, EIO, EROFS, EACCES, ...) and what torch.save (RuntimeError) and
    safetensors (SafetensorError) raise for the same failures; other exceptions pass through unchanged.
    """
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(write_failure(path, error.strerror or str(error), error.errno)) from error
    except Exception as error:
        code = _failed_write_errno(error)
        if code is None:
            raise
        raise WriteError(write_failure(path, os.strerror(code) if code else "the write failed", code)) from error


def _failed_write_errno(error: Exception) -> int | None:
    """The errno of a failed write reported by torch or safetensors (0 when they do not say), else None."""
    text = str(error)
    if isinstance(error, RuntimeError) and any(words in text for words in _TORCH_WRITE_FAILURES):
        return 0
    if type(error).__name__ == "SafetensorError" and "I/O error" in text:
        found = re.search(r"os error (\d+)", text)
        return int(found.group(1)) if found else 0
    return None


def write_failure(path: str | os.PathLike, reason: str, code: int | None) -> str:
    """``cannot write PATH: REASON (N MiB free on that disk)``, the free space measured now."""
    free = free_space(path)
    where = f"; {free} free on that disk" if free is not None else ""
    hint = ": free some space and run again" if code in (errno.ENOSPC, errno.EDQUOT) or free == "0 B" else ""
    return f"cannot write {path}: {reason}{where}{hint}"


def free_space(path: str | os.PathLike) -> str | None:
    """Free space on the disk holding ``path`` (or its nearest existing parent), human-readable."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return None


def _set_default_mode(path: str | os.PathLike) -> None:
    """mkstemp makes files private (0600); give them the mode a plain open() would (0666 less umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file (from ``temp_path_beside``) over ``path``, with normal permissions."""
    with write_errors(path):
        _set_default_mode(tmp)
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def temp_path_beside(path: str | os.PathLike) -> Path:
    """A fresh temporary path in ``path``'s folder, for writers that insist on a file name
    (torch.onnx, matplotlib); pair it with publish(tmp, path) once the file is complete."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that insist on a file name (torch, matplotlib,
    safetensors); published over ``path`` on success, removed on error, write failures as WriteError."""
    tmp = temp_path_beside(path)
    try:
        with write_errors(path):
            yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
