"""Crash-safe file output shared by checkpoints, data preparation and exports: write to a temporary name in
the same folder, fsync, rename. A crash leaves either the old file or folder or the new one, never half."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import DualPathError


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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw) -> Iterator[IO]:
    """The one writer: a file object on a temp name in the same folder; on a clean exit it is flushed,
    fsynced and renamed over `path`; on an exception it is removed and `path` is untouched.
    Every file the project writes goes through here (text: mode "w" with newline/encoding; binary: "wb")."""
    path = Path(path)
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files (mode 'w' or 'wb'), not {mode!r}")
    if mode == "w":
        kw.setdefault("encoding", "utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, mode, **kw) as f:
            yield f
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


def atomic_write_bytes(path: str | os.PathLike, chunks: Any) -> None:
    """Write an iterable of bytes-like chunks to `path` atomically."""
    with atomic_open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, **kw) -> None:
    kw.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **kw) + "\n")


def atomic_save_figure(fig: Any, path: str | os.PathLike, **kw) -> None:
    """A matplotlib figure, written atomically (the format from the file name's suffix)."""
    kw.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, **kw)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file's bytes to `dst` atomically."""
    with open(src, "rb") as f_in, atomic_open(dst, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """DualPathError unless `path` is, or can be created as, a folder this process may write into: not a
    file, no file among its parents, its nearest existing ancestor writable. Nothing is left behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DualPathError(f"{what} {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise DualPathError(f"{what} {path}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise DualPathError(f"{what} {path}: {probe} is not writable")
    if probe.is_dir():  # root passes os.access everywhere, and some file systems (/proc) refuse any folder
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".write_check_", dir=probe))
        except OSError as e:
            raise DualPathError(f"{what} {path}: cannot create a folder in {probe} ({e.strerror})") from None
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """DualPathError unless `path` can be written as a file: its folder exists and is writable, and `path`
    is not a folder. Nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise DualPathError(f"{what} {path} is a folder")
    parent = path.parent
    if not parent.is_dir():
        raise DualPathError(f"{what} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DualPathError(f"{what} {path}: the folder {parent} is not writable")
    return path


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


LOCK_NAME = ".lock"


class FolderLock:
    """An exclusive lock on a folder (RUN/.lock), so two processes never write one run.

    The lock is an flock on the file, held by the kernel: it ends with the process however that ends
    (a crash or kill -9 leaves no stale lock; the file stays, with the last holder's pid for the message).
    A second process refuses at once with a DualPathError naming the holder."""

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None

    @staticmethod
    def holder(folder: str | os.PathLike, name: str = LOCK_NAME) -> str | None:
        """Who holds the lock now ("pid N on HOST"), or None when nobody does; creates nothing."""
        import fcntl

        path = Path(folder) / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except OSError:
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        finally:
            os.close(fd)  # closing drops a lock taken here

    def acquire(self, wait: float = 0.0) -> "FolderLock":
        """wait: seconds to keep trying while another process holds it (e.g. a requeued job whose previous
        process is still exiting); 0 refuses at once."""
        import fcntl
        import time

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DualPathError(f"{self.folder} is in use by {holder}: one run per folder "
                                f"(wait for it, or use another folder)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
