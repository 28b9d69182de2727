"""Validation of training files: every line once, problems reported as ``file:line: field: reason``,
rejected lines written aside under ``on_bad_record: skip``."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from clp_ray.config import resolve_path
from clp_ray.data.files import BOM, GZIP_MAGIC, expand_paths, iter_lines, open_data_file
from clp_ray.data.records import check_record
from clp_ray.data.report import Problem, ValidationReport
from clp_ray.errors import DataError
from clp_ray.util.atomic import atomic_path

log = logging.getLogger(__name__)


DUPLICATE_POLICIES = ("keep", "drop", "error")


@dataclass
class ScanStats:
    records: int = 0
    good: int = 0
    blank: int = 0
    duplicates: int = 0  # good records identical to an earlier one (any file)
    problems: list[Problem] = field(default_factory=list)
    content_hash: str = ""


def scan_files(files: list[str], stats: ScanStats, *, require_neg_q: bool, group_size: int, max_line_bytes: int,
          on_duplicate: str = "keep", spill: Optional[Callable[[str, int], Any]] = None):
    """Stream every line of every file once, yielding ``(record, None, None)`` for good records
    and ``(None, problem, raw_line)`` for bad ones; counts and the content hash go to ``stats``.

    A record identical to an earlier one is counted and, by ``on_duplicate``, kept, dropped or
    reported as a problem. ``spill(path, line)`` opens a sink for an over-long line's bytes."""
    digest = hashlib.sha256()
    seen: dict[bytes, tuple[int, int]] = {}  # record digest -> (file index, line) of its first occurrence
    for index, path in enumerate(files):
        digest.update(path.rsplit("/", 1)[-1].encode() + b"\0")
        nonblank_in_file = 0
        with open_data_file(path) as f:
            sink = (lambda n, path=path: spill(path, n)) if spill else None
            for lineno, raw, length in iter_lines(f, max_line_bytes, sink):
                if raw is not None:
                    digest.update(raw)
                    if lineno == 1:
                        if raw.startswith(GZIP_MAGIC) and not path.endswith(".gz"):
                            p = Problem(path, 0, "<file>", "gzip-compressed data in a file not named *.gz "
                                                           "(name it .jsonl.gz to read it)")
                            stats.problems.append(p)
                            yield None, p, b""
                            break
                        raw = raw.removeprefix(BOM)  # a UTF-8 byte order mark is not part of the record
                    if not raw.strip():
                        stats.blank += 1
                        continue
                nonblank_in_file += 1
                stats.records += 1
                problem, rec = _parse_line(raw, length, max_line_bytes, require_neg_q=require_neg_q, group_size=group_size)
                if not problem:
                    key = hashlib.sha1(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode()).digest()
                    first = seen.setdefault(key, (index, lineno))
                    if first != (index, lineno):
                        stats.duplicates += 1
                        if on_duplicate == "drop":
                            continue
                        if on_duplicate == "error":
                            problem = ("<record>", f"duplicate of {files[first[0]]}:{first[1]} (data.on_duplicate = error)")
                if problem:
                    p = Problem(path, lineno, *problem)
                    stats.problems.append(p)
                    yield None, p, raw
                else:
                    stats.good += 1
                    yield rec, None, None
        if nonblank_in_file == 0 and not any(p.file == path and p.line == 0 for p in stats.problems):
            p = Problem(path, 0, "<file>", "empty file (no records)")
            stats.problems.append(p)
            yield None, p, b""
    stats.content_hash = digest.hexdigest()[:16]


def _parse_line(raw: Optional[bytes], length: int, max_line_bytes: int, *, require_neg_q: bool, group_size: int):
    if raw is None:
        return ("<line>", f"line is {length} bytes, longer than data.max_line_bytes = {max_line_bytes}"), None
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return ("<line>", f"invalid UTF-8 at byte {e.start}"), None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return ("<line>", f"malformed JSON: {e.msg} (column {e.colno})"), None
    except ValueError as e:  # an integer of thousands of digits
        return ("<line>", f"unreadable JSON: {str(e).split(';')[0]}"), None
    except RecursionError:
        return ("<line>", "JSON nested too deeply"), None
    problem = check_record(rec, require_neg_q=require_neg_q, group_size=group_size)
    return problem, (None if problem else rec)


class _Rejects:
    """The skip policy's rejects file: one JSON line per rejected record with its reason and its
    bytes, exactly (``raw_base64``; ``raw`` too when they are UTF-8 text). An over-long line is
    streamed into a sidecar file named in ``raw_file``, never held in memory."""

    def __init__(self, sink, path: Path):
        self.sink = sink
        self.sidecar_dir = Path(f"{path}.lines")
        self.sidecars: dict[tuple[str, int], Path] = {}

    def spill(self, file: str, line: int):
        self.sidecar_dir.mkdir(parents=True, exist_ok=True)
        target = self.sidecar_dir / f"{len(self.sidecars):06d}-{Path(file).name}-line{line}.bin"
        self.sidecars[(file, line)] = target
        return open(target, "wb")

    def write(self, p: Problem, raw: Optional[bytes]) -> None:
        row: dict[str, Any] = {"file": p.file, "line": p.line, "field": p.field, "reason": p.reason}
        if (p.file, p.line) in self.sidecars:
            row["raw_file"] = str(self.sidecars[(p.file, p.line)])
        elif raw:
            row["raw_base64"] = base64.b64encode(raw).decode("ascii")
            try:
                row["raw"] = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                pass
        self.sink.write(json.dumps(row, ensure_ascii=False) + "\n")


def validate(
    paths: Sequence[str],
    *,
    require_neg_q: bool = False,
    group_size: int = 2,
    max_line_bytes: int = 1_000_000,
    on_bad_record: str = "error",
    rejects_path: Optional[str | Path] = None,
    on_duplicate: str = "keep",
) -> ValidationReport:
    """Validate CLP JSONL files; raise :class:`DataError` under ``error`` when any record is bad.

    Under ``skip`` every rejected line is written (atomically) to ``rejects_path`` as JSONL
    ``{"file", "line", "field", "reason", "raw_base64", "raw" | "raw_file"}`` (see :class:`_Rejects`).
    Records identical to an earlier one are counted and kept, dropped or rejected (``on_duplicate``).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    if on_duplicate not in DUPLICATE_POLICIES:
        raise ValueError(f"on_duplicate must be one of {DUPLICATE_POLICIES}, got {on_duplicate!r}")
    files = expand_paths(list(paths))
    if rejects_path is not None:
        from clp_ray.util.output_guard import check_outputs

        check_outputs({"the rejects file": rejects_path},
                      {**{f"data {p}": resolve_path(p) for p in paths}, **{f"data file {f}": f for f in files}})
    log.info("training data: %d file(s): %s", len(files), ", ".join(files))
    stats = ScanStats()
    kw = {"require_neg_q": require_neg_q, "group_size": group_size, "max_line_bytes": max_line_bytes, "on_duplicate": on_duplicate}
    report = ValidationReport(files=files)
    if on_bad_record == "skip" and rejects_path is not None:
        with atomic_path(rejects_path) as tmp, open(tmp, "w", encoding="utf-8") as sink:
            rejects = _Rejects(sink, Path(rejects_path))
            for _, p, raw in scan_files(files, stats, spill=rejects.spill, **kw):
                if p is not None:
                    rejects.write(p, raw)
        report.rejects_path = str(rejects_path)
    else:
        for _ in scan_files(files, stats, **kw):
            pass
    report.records, report.good, report.blank_lines = stats.records, stats.good, stats.blank
    report.problems, report.content_hash = stats.problems, stats.content_hash
    report.duplicates, report.on_duplicate = stats.duplicates, on_duplicate
    if report.duplicates and on_duplicate == "keep":
        log.warning("%d record(s) are duplicates of earlier ones and will be trained on again "
                    "(data.on_duplicate = keep; drop or error to change that)", report.duplicates)
    if on_bad_record == "error" and report.bad:
        raise DataError(f"{report.bad} bad record(s) in the training data (data.on_bad_record = error):\n"
                        + report.text())
    if report.good == 0:
        raise DataError("no usable training records:\n" + report.text())
    if report.bad:
        log.warning("skipped %d bad record(s); see %s", report.bad, report.rejects_path or "the report")
    return report
