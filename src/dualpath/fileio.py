"""Crash-safe file output shared by checkpoints, data preparation and exports: write to a temporary name in
the same folder, fsync, rename. A crash leaves either the old file or folder or the new one, never half."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | os.PathLike) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported everywhere; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    for p in Path(root).rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(root)


def default_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path: str | os.PathLike, chunks: Any) -> None:
    """Write an iterable of bytes-like chunks to `path` via a temp name in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, [text.encode("utf-8")])


def check_out_dir(out: Path, overwrite: bool, error: type[Exception]) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless overwrite."""
    if out.exists() and not out.is_dir():
        raise error(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(f"output folder {out} exists and is not empty (use --overwrite)")


def install_dir(tmp: Path, out: Path) -> None:
    """Rename a finished temp folder into place; an old `out` is moved aside first and deleted only after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "x"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
    fsync_dir(out.parent)
