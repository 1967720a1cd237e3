"""Durable file writes: temp file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cocoon_net.errors import HostSetupError


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, dir_mode: int = 0o750) -> None:
    """Replace path with data so that a reader sees the old or the new content, never a mix.

    The content and the directory entry are both on disk when this returns. The temp file
    name starts with the target's name and a dot, so leftovers of a crash are easy to find.
    """
    import tempfile  # only writers need it (it pulls in random and hashlib): status stays quick

    try:
        path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise HostSetupError(f"write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise HostSetupError(f"write {path}: {exc.strerror or exc}") from exc


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files a crashed atomic_write of path left behind; return what was removed."""
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed.append(leftover)
    return removed


def remove_file(path: Path) -> bool:
    """Delete path if present; True when something was removed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise HostSetupError(f"remove {path}: {exc.strerror}") from exc
    return True
