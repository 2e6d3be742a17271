"""Atomic writes: a temp file beside the target, fsync, rename. A crash leaves the old file or the new one."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str | Path, dst: str | Path) -> None:
    """Move a finished file into place so that a crash leaves the old file or the whole new one."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    _fsync_dir(Path(dst).parent)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path` for a writer that wants a file name; on success it is fsynced and
    replaces `path`, on failure it is removed. Readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        durable_replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_staging(final: str | Path) -> list[Path]:
    """Remove the staging directories of `final` (`.<name>.<pid>.<random>.tmp`, made by `atomic_dir`) whose
    creating process is gone, e.g. after a kill -9 mid-export. Staging directories of a live process are
    left alone; ones without a pid (older mmagent) cannot be attributed and are named in a warning.
    Returns the removed directories."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    with_pid = re.compile(rf"^\.{re.escape(final.name)}\.(\d+)\.[a-z0-9_]+\.tmp$")
    without_pid = re.compile(rf"^\.{re.escape(final.name)}\.[a-z0-9_]+\.tmp$")
    removed, unknown = [], []
    for d in sorted(final.parent.iterdir()):
        if not d.is_dir() or d.is_symlink():
            continue
        if m := with_pid.match(d.name):
            pid = int(m.group(1))
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        elif without_pid.match(d.name):
            unknown.append(d)
    if unknown:
        warnings.warn(f"staging director{'y' if len(unknown) == 1 else 'ies'} "
                      f"{', '.join(f'`{d}`' for d in unknown)} of `{final}` left by an interrupted write of an "
                      "older mmagent (no process id recorded); delete them if no export or training is writing "
                      f"`{final}` now", stacklevel=3)
    return removed


@contextmanager
def atomic_dir(final: str | Path, force: bool = False):
    """Yield a temp directory; on success it replaces `final` in one rename (the old one moved aside first).

    The temp directory `.<name>.<pid>.<random>.tmp` carries this process's id, so a later write to the same
    target removes the ones whose process died before finishing (kill -9, power loss)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists():
            if not force:
                raise FileExistsError(f"{final} already exists; pass --force to replace it")
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """Where mmagent keeps what it builds once: bases, the shapes world, tokenizers, probe results."""
    return Path(os.environ.get("MMAGENT_CACHE", Path.home() / ".cache" / "mmagent"))
