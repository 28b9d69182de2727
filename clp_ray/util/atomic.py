"""Atomic writes: readers see either the old output or the complete new one, never a partial file."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clp_ray.errors import ClpRayError

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _final_mode(path: Path, is_dir: bool) -> int:
    """The mode the output should have: the one the file it replaces had, else what a plain
    ``open``/``mkdir`` would give under the umask (mkstemp/mkdtemp make 0600/0700 temps)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return (0o777 if is_dir else 0o666) & ~_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it is renamed over ``path``.

    The temp lives in the same directory so the final ``os.replace`` is a same-filesystem rename.
    On error the temp is removed and ``path`` is untouched. The output gets the mode of the file it
    replaces, or the umask's. ``keep_existing`` (caches that several processes may build at once):
    when ``path`` exists by the time the temp is done, the first one stays and the temp is dropped,
    so a reader never finds the folder moved aside.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _final_mode(path, is_dir))
        if is_dir:
            _publish_dir(tmp, path, keep_existing)
        elif keep_existing and path.exists():
            _remove(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _publish_dir(tmp: Path, path: Path, keep_existing: bool) -> None:
    if keep_existing:
        try:
            os.rename(tmp, path)  # fails if another process published first: keep theirs
        except OSError:
            if not path.is_dir():
                raise
            _remove(tmp)
        return
    # A directory cannot be replaced atomically when the target is non-empty: move the old one
    # aside first so that a crash leaves either the old or the new folder in place.
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = False) -> None:
    """Fail before any work, not after it, when an output cannot be created at ``path`` (a file,
    or with ``folder=True`` a folder): creates the missing parents and writes and removes a probe.
    ``what`` names the setting in the message (``--summary``, ``train.output_dir = ...``)."""

    p = Path(path)
    if p.is_dir() and not folder:
        raise ClpRayError(f"{what}: {path} is a folder; give a file path")
    if p.exists() and not p.is_dir() and folder:
        raise ClpRayError(f"{what}: {path} is a file, not a folder")
    existing = next(a for a in p.absolute().parents if a.exists())
    if not existing.is_dir():  # mkdir would only say "File exists"
        raise ClpRayError(f"{what}: cannot write to {path} ({existing} is a file, not a folder)")
    target = p if folder else p.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ClpRayError(f"{what}: cannot write to {path} ({e.strerror or e})") from None
