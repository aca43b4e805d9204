"""Crash-safe writes and inter-process locks, shared by the trainer, the run store, the
proposal cache, the synthetic data and the Slurm state file. No torch here: the run store
and the Slurm commands import it without loading the trainer."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write failed for want of space (or quota); the message names the folder, says what was
    kept and that the same command resumes once space is freed."""


def no_space(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it arose from is "no space left" (torch.save's
    ``RuntimeError: ... unexpected pos`` carries the ``OSError`` as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in NO_SPACE):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(folder: str | os.PathLike, what: str = "") -> DiskFull:
    """The one-line error for a full ``folder``."""
    try:
        free = f" ({shutil.disk_usage(folder).free // 2**20} MiB free)"
    except OSError:
        free = ""
    return DiskFull(errno.ENOSPC, f"no space left in {folder}{free}" + (f" writing {what}" if what else "")
                    + ": the file being written was removed; every file written before it is whole (checkpoints, "
                      "finished runs, tables). Free space and run the same command again: it resumes")


def fullest(folders) -> str:
    """Of ``folders``, the one whose file system has the least space free (the one a "no
    space" error without a file name most likely meant)."""
    def free(f):
        try:
            return shutil.disk_usage(f).free
        except OSError:
            return float("inf")
    return str(min(folders, key=free))


def raise_if_full(e: BaseException, path: str | os.PathLike) -> None:
    """Re-raise a failed write of ``path`` as :func:`disk_full` when it failed for want of space."""
    if no_space(e) and not isinstance(e, DiskFull):
        raise disk_full(Path(path).parent, Path(path).name) from None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temporary file beside it: fsync'd and renamed onto ``path``
    when the block ends, removed if it raises, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise_if_full(e, path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def json_bytes(obj: Any, indent: int = 2) -> bytes:
    """``obj`` as the harness writes JSON files: sorted keys, indented, a final newline."""
    return (json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n").encode()


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_bytes(path, json_bytes(obj, indent))


def unwritable(folder: str | os.PathLike, create: bool = True) -> str | None:
    """Why files cannot be created in ``folder`` (created if missing), or None when they can.
    ``create=False``: asked before anything is written, the folder is left as it is (its
    nearest existing parent is asked instead)."""
    folder = Path(folder)
    if not create:
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create it: {e.strerror or e}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    return None


class UnwritableError(OSError):
    """A folder the harness must write into cannot be written; the message names it."""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "cache") -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing) for the block: concurrent
    runs (parallel local jobs, array tasks) build a shared artifact once. A folder where the
    lock cannot be created raises ``UnwritableError`` naming it (a complete read-only cache
    is read by its callers without taking the lock)."""
    path = Path(path)
    why = unwritable(path.parent)
    fix = (": point DETBENCH_CACHE at a writable folder, or fill this one once from an account that can "
           "write it" if what == "cache" else "")
    if why:
        raise UnwritableError(f"{what} {path.parent} is not writable ({why}){fix}")
    try:
        fh = open(path, "a")
    except PermissionError as e:
        raise UnwritableError(f"{what} {path.parent}: cannot open the lock {path} ({e.strerror}){fix}") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def walk_files(root: str | os.PathLike) -> list[Path]:
    """Every file under ``root``, sorted, symlinked folders entered too (``Path.rglob`` does
    not: a symlinked ``Annotations/`` or image subfolder would drop out unnoticed). A folder
    reached twice (a link cycle, two links to one folder) is read once, by (st_dev, st_ino),
    under the first of its paths in sorted order."""
    seen: set[tuple[int, int]] = set()
    out = []
    for top, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()   # the same walk on every file system
        out += [Path(top, f) for f in files]
    return sorted(p for p in out if p.is_file())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
