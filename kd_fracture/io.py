"""Atomic file writes and hashing. Every file the package writes goes through here.

A write goes to a temporary file in the same directory, is flushed and fsynced, then `os.replace`d over the
target, so a reader (or a rerun after SIGKILL) sees either the old file or the new one, never half of one.

A full disk is a `DiskFullError` (one line: path, bytes needed, bytes free, what to do), never a traceback: a write
whose size is known (`write_bytes` and its callers; `atomic_path(expect_bytes=…)` for torch.save/safetensors) is
refused up front when its filesystem has too little free space, and any ENOSPC/EDQUOT during a write — including
torch's "unexpected pos" and safetensors' "No space left on device", which hide the errno — is translated. Either
way the temporary file is removed and the old file, if any, is kept.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from kd_fracture.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(UserError):
    """A write did not fit on its filesystem. Message: the target path, the bytes needed and free, what to do."""

    def __init__(self, path: Path, needed: int, free: int, exact: bool = True):
        mount = mount_point(path.parent)
        short = max(needed - free, 0) if exact else needed  # unknown total: at least what was already written
        free_mb = max(1, math.ceil(short / 1e6))
        need_text = f"{_size(needed)}" if exact else f"more than {_size(needed)}"
        super().__init__(f"{path}: disk full — writing it needs {need_text}, {_size(free)} free on {mount}; "
                         f"free at least {free_mb} MB on {mount} or point --out at a bigger disk, then rerun the "
                         f"same command: finished folds are kept")
        self.path, self.needed, self.free, self.mount = path, needed, free, mount


_WRITE_SLACK = 64 * 1024
"""Bytes of free space kept beyond a write's own size in the up-front check: filesystem block rounding and metadata
(a 200-byte JSON still takes a 4 KiB block), so a write that passes the check does not fail on the last block."""

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What writers that hide the errno say instead. torch.save (PyTorchStreamWriter): "[enforce fail at
# inline_container.cc:…] . unexpected pos N vs M" or "… file write failed"; safetensors: "I/O error: No space left on
# device (os error 28)" (Rust's StorageFull); Disk quota exceeded = EDQUOT (os error 122).
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "unexpected pos", "file write failed",
                   "os error 28", "os error 122", "storagefull")


def is_disk_full(e: BaseException) -> bool:
    """True when `e`, or an exception it was raised from, is a full disk or an exceeded quota."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return False  # already the one-line message
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(e, Exception) and not isinstance(e, OSError):
            text = str(e).lower()
            if any(t in text for t in _DISK_FULL_TEXT):
                return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on `folder`'s filesystem (statvfs f_bavail)."""
    return shutil.disk_usage(folder).free


def mount_point(folder: str | os.PathLike) -> Path:
    """The mount point holding `folder` (its nearest existing ancestor, walked up to a mount)."""
    p = Path(os.path.abspath(folder))
    while not p.exists():
        p = p.parent
    while not os.path.ismount(p):
        p = p.parent
    return p


def check_free(path: str | os.PathLike, nbytes: int) -> None:
    """DiskFullError unless `path`'s filesystem has room for `nbytes` new bytes (plus _WRITE_SLACK).

    Replacing an existing file needs room for the new copy only: the old one already occupies its own space and
    stays until `os.replace`, so the disk holds both (2× the size) for a moment, and that is what free space must
    allow — `nbytes` beyond what is used now.
    """
    path = Path(path)
    free = free_bytes(path.parent)
    if free < nbytes + _WRITE_SLACK:
        raise DiskFullError(path, nbytes + _WRITE_SLACK, free)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, expect_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, on error delete it.

    For writers that want a filename (pandas, matplotlib, safetensors, torch.save). `expect_bytes`: about how large
    the file will be, when the caller knows (a state_dict's tensor bytes); the write is then refused up front if the
    disk lacks the room. A full disk during the write (module docstring) becomes DiskFullError; the temporary file
    is removed either way, and an existing file at `path` is left as it was.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if expect_bytes is not None:
            check_free(path, expect_bytes)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    except BaseException as e:
        written = 0
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                written = tmp_path.stat().st_size
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        if is_disk_full(e):
            free = free_bytes(path.parent) if path.parent.exists() else 0
            if expect_bytes is not None:
                raise DiskFullError(path, expect_bytes + _WRITE_SLACK, free) from None
            raise DiskFullError(path, written, free, exact=False) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` atomically; refused up front (DiskFullError) when the disk cannot hold it."""
    with atomic_path(path, expect_bytes=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def write_csv(path: str | os.PathLike, df, **kwargs) -> Path:
    """Write a pandas DataFrame as CSV (index off unless asked)."""
    kwargs.setdefault("index", False)
    return write_text(path, df.to_csv(**kwargs))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _size(n: int) -> str:
    """Bytes for a person: `1,990,656 bytes (2.0 MB)`."""
    return f"{n:,} bytes ({n / 1e6:.1f} MB)"


def _json_default(o: Any) -> Any:
    # numpy scalars/arrays and Paths appear in metrics dicts
    if hasattr(o, "item") and getattr(o, "shape", None) == ():
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class LockedError(OSError):
    """Another process holds the advisory lock (see `flock`)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: locked by {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def flock(path: str | os.PathLike, shared: bool = False) -> Iterator[Path]:
    """Hold an advisory `fcntl.flock` on `path` (created if missing) for the `with` block, without waiting.

    exclusive: one holder; shared: any number of shared holders, none while an exclusive one holds it. The lock
    dies with the process (SIGKILL included), so a stale lock file never blocks. The file records the last
    holder's PID, host and start time, named in LockedError when the lock is taken.
    """
    import fcntl
    import socket
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise LockedError(path, holder) from None
        me = f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        with contextlib.suppress(OSError):  # diagnostics only: who to look for when the lock is refused; on a
            os.ftruncate(fd, 0)              # full disk the lock still holds, and the run's first real write
            os.pwrite(fd, me.encode(), 0)    # reports the disk (DiskFullError)
        yield path
    finally:
        os.close(fd)  # closing releases the lock
