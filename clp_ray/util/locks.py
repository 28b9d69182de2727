"""File locks for the few places two clp-ray processes on one machine must not interleave.

``flock`` locks, so they hold across processes and threads on one machine (each ``open`` is its
own lock owner) and vanish with a crashed process; two machines are not coordinated by them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clp_ray.errors import ClpRayError
from clp_ray.util.cache import cache_root


def lock_file(kind: str, *keys: str) -> Path:
    """A lock file under ``$CLP_RAY_CACHE/locks`` named by ``kind`` and a hash of ``keys``."""

    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{hashlib.sha256(chr(0).join(keys).encode()).hexdigest()[:16]}.lock"


@contextmanager
def serialised(path: str | os.PathLike) -> Iterator[None]:
    """Wait for, then hold, the lock at ``path``."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock at ``path``, or fail at once with :class:`ClpRayError` naming ``what`` and the
    process that holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ClpRayError(f"{what} is already running in {holder}; wait for it to finish, or give this one "
                              "another train.run_name or train.output_dir") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()}")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
