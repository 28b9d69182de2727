"""Finding and reading training files: folders expanded, gzip and a BOM handled, long lines never held whole."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import fsspec

from clp_ray.config import resolve_path
from clp_ray.errors import DataError

DATA_SUFFIXES = (".jsonl", ".jsonl.gz")
GZIP_MAGIC = b"\x1f\x8b"
BOM = b"\xef\xbb\xbf"


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files named directly, plus every ``*.jsonl`` / ``*.jsonl.gz`` under a named folder
    (recursively, sorted); local or fsspec."""

    if not paths:
        raise DataError("no training data given (data.train_paths is empty)")
    out: list[str] = []
    for raw in paths:
        path = resolve_path(raw)
        try:
            fs, p = fsspec.core.url_to_fs(path)
            if fs.isdir(p):
                found = sorted(f for f in fs.find(p) if f.endswith(DATA_SUFFIXES))
                if not found:
                    raise DataError(f"{raw}: folder has no *.jsonl or *.jsonl.gz files")
                special = [f for f in found if "://" not in path and not Path(f).is_file()]
                if special:
                    raise DataError(f"{special[0]}: not a regular file (a FIFO or device would block or never end)")
                out.extend(fs.unstrip_protocol(f) if "://" in path else f for f in found)
            elif fs.exists(p):
                if "://" not in path and not Path(p).is_file():  # a FIFO or device would block or never end
                    raise DataError(f"{raw}: not a regular file")
                out.append(path)
            else:
                raise DataError(f"{raw}: no such file or folder")
        except DataError:
            raise
        except (OSError, ValueError, ImportError) as e:
            raise DataError(f"{raw}: cannot open: {e}") from None
    return out


def open_data_file(path: str):
    """A binary reader of ``path``; ``*.gz`` files are decompressed on the fly."""

    return fsspec.open(path, "rb", compression="gzip" if path.endswith(".gz") else None).open()


def iter_lines(f, max_line_bytes: int, spill: Optional[Callable[[int], Any]] = None
                ) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, raw line or None when too long, length). Never holds an over-long line:
    with ``spill``, its bytes are streamed into the binary file ``spill(line number)`` opens."""
    n = 0
    while True:
        chunk = f.readline(max_line_bytes + 1)
        if not chunk:
            return
        n += 1
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            sink = spill(n) if spill else None
            length = 0
            try:
                while chunk:
                    length += len(chunk)
                    if sink is not None:
                        sink.write(chunk)
                    if chunk.endswith(b"\n"):
                        break
                    chunk = f.readline(1 << 20)
            finally:
                if sink is not None:
                    sink.close()
            yield n, None, length
        else:
            yield n, chunk, len(chunk)
