"""CLP training data: record validation, datasets-backed loading, train/dev split, grouping, collation.

Record (JSON Lines, one per line; ``../shared/DESIGN.md`` §3)::

    {"query": str, "pos": [str, ...], "neg": [str, ...], "neg_q": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...]}        # scores optional

``neg_q[i]`` is the query that ``neg[i]`` is relevant to. Validation streams every line once (a
line longer than ``max_line_bytes`` is never held whole) and reports ``file:line: field: reason``.
Under ``on_bad_record: error`` it stops with the first 20 problems and the total; under ``skip`` it
writes each rejected line with its reason to a rejects file and reports the counts.

Command line: ``python -m clp_ray.data FILE_OR_DIR ... [--lam 0.1] [--group-size 8]`` prints the
report; exit 0 only when every record is good.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import fsspec
import torch

from clp_ray.atomic import atomic_path
from clp_ray.config import resolve_path
from clp_ray.errors import ConfigError, DataError
from clp_ray.evaluation import RetrievalSet
from clp_ray.unicode_text import SURROGATE, is_valid_text

log = logging.getLogger(__name__)

MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


@dataclass
class ValidationReport:
    files: list[str]
    records: int = 0  # non-blank lines seen
    good: int = 0
    blank_lines: int = 0
    problems: list[Problem] = field(default_factory=list)  # one per bad record (its first problem)
    content_hash: str = ""
    rejects_path: Optional[str] = None
    duplicates: int = 0  # records identical to an earlier one
    on_duplicate: str = "keep"  # what loading does with them: keep | drop (error: they are problems)

    @property
    def bad(self) -> int:
        return len(self.problems)

    def counts(self) -> dict[str, int]:
        return dict(Counter(f"{p.field}: {p.reason.split(' (')[0]}" for p in self.problems).most_common())

    def text(self, limit: Optional[int] = MAX_LISTED) -> str:
        shown = self.problems if limit is None else self.problems[:limit]
        lines = [str(p) for p in shown]
        if limit is not None and self.bad > limit:
            lines.append(f"... and {self.bad - limit} more")
        lines.append(f"{len(self.files)} file(s), {self.records} records: {self.good} good, {self.bad} bad"
                     + (f", {self.blank_lines} blank lines ignored" if self.blank_lines else "")
                     + (f", {self.duplicates} duplicate(s) {'dropped' if self.on_duplicate == 'drop' else 'found'}"
                        if self.duplicates else ""))
        lines.extend(f"  {n:>6}  {what}" for what, n in self.counts().items())
        if self.rejects_path:
            lines.append(f"rejected lines written to {self.rejects_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "records": self.records, "good": self.good, "bad": self.bad,
                "duplicates": self.duplicates, "on_duplicate": self.on_duplicate,
                "problem_counts": self.counts(), "content_hash": self.content_hash, "rejects_path": self.rejects_path}


# --------------------------------------------------------------------------------------------
# Files.


DATA_SUFFIXES = (".jsonl", ".jsonl.gz")
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"


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


def _open(path: str):
    """A binary reader of ``path``; ``*.gz`` files are decompressed on the fly."""

    return fsspec.open(path, "rb", compression="gzip" if path.endswith(".gz") else None).open()


def _iter_lines(f, max_line_bytes: int, spill: Optional[Callable[[int], Any]] = None
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


# --------------------------------------------------------------------------------------------
# One record.


def _check_str_list(rec: dict, key: str, *, required: bool, nonempty: bool) -> Optional[tuple[str, str]]:
    if key not in rec:
        return (key, "missing field") if required else None
    value = rec[key]
    if not isinstance(value, list):
        return key, f"must be a list of strings, got {type(value).__name__}"
    if nonempty and not value:
        return key, "empty list"
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return key, f"item {i} must be a string, got {type(item).__name__}"
        if not item.strip():
            return key, f"item {i} is an empty string"
        if not is_valid_text(item):
            return key, f"item {i} {SURROGATE}"
    return None


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _check_scores(rec: dict, key: str, against: str) -> Optional[tuple[str, str]]:
    if key not in rec:
        return None
    value = rec[key]
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return key, "must be a list of numbers"
    if not all(_finite(v) for v in value):
        return key, "contains NaN, infinity or a number too large for a float"
    if len(value) != len(rec.get(against, [])):
        return key, f"length {len(value)} differs from {against} length {len(rec.get(against, []))}"
    return None


def check_record(rec: Any, *, lam: float, group_size: int) -> Optional[tuple[str, str]]:
    """(field, reason) of the first problem of a parsed record, or None when it is good."""
    if not isinstance(rec, dict):
        return "<record>", f"must be a JSON object, got {type(rec).__name__}"
    q = rec.get("query")
    if "query" not in rec:
        return "query", "missing field"
    if not isinstance(q, str):
        return "query", f"must be a string, got {type(q).__name__}"
    if not q.strip():
        return "query", "empty string"
    if not is_valid_text(q):
        return "query", SURROGATE
    for problem in (
        _check_str_list(rec, "pos", required=True, nonempty=True),
        _check_str_list(rec, "neg", required=True, nonempty=group_size > 1),
        _check_str_list(rec, "neg_q", required=False, nonempty=False),
    ):
        if problem:
            return problem
    if "neg_q" in rec and len(rec["neg_q"]) != len(rec["neg"]):
        return "neg_q", f"length {len(rec['neg_q'])} differs from neg length {len(rec['neg'])}"
    if "neg_q" not in rec and lam > 0:
        return "neg_q", f"missing while loss.lam = {lam} > 0 (set lam to 0 for plain contrastive data)"
    return _check_overlaps(rec) or _check_scores(rec, "pos_scores", "pos") or _check_scores(rec, "neg_scores", "neg")


def _check_overlaps(rec: dict) -> Optional[tuple[str, str]]:
    """A negative that is one of the record's positives (InfoNCE would push the positive away from
    itself), or a ``neg_q`` that is the record's own query (the penalty would pull the negative
    toward the very query it is a negative for). Texts compare without surrounding whitespace."""
    positives = {p.strip(): i for i, p in enumerate(rec["pos"])}
    for i, n in enumerate(rec["neg"]):
        if n.strip() in positives:
            return "neg", f"item {i} is the same text as pos item {positives[n.strip()]} (a positive cannot be its negative)"
    for i, nq in enumerate(rec.get("neg_q", [])):
        if nq.strip() == rec["query"].strip():
            return "neg_q", f"item {i} is the record's own query (it must be the query that neg item {i} answers)"
    return None


def normalize_record(rec: dict) -> dict:
    """The fixed Arrow schema: absent optional lists become empty lists."""
    return {
        "query": rec["query"],
        "pos": rec["pos"],
        "neg": rec["neg"],
        "neg_q": rec.get("neg_q", []),
        "pos_scores": [float(x) for x in rec.get("pos_scores", [])],
        "neg_scores": [float(x) for x in rec.get("neg_scores", [])],
    }


# --------------------------------------------------------------------------------------------
# Files of records.


DUPLICATE_POLICIES = ("keep", "drop", "error")


@dataclass
class _ScanStats:
    records: int = 0
    good: int = 0
    blank: int = 0
    duplicates: int = 0  # good records identical to an earlier one (any file)
    problems: list[Problem] = field(default_factory=list)
    content_hash: str = ""


def _scan(files: list[str], stats: _ScanStats, *, lam: float, group_size: int, max_line_bytes: int,
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
        with _open(path) as f:
            sink = (lambda n, path=path: spill(path, n)) if spill else None
            for lineno, raw, length in _iter_lines(f, max_line_bytes, sink):
                if raw is not None:
                    digest.update(raw)
                    if lineno == 1:
                        if raw.startswith(_GZIP_MAGIC) and not path.endswith(".gz"):
                            p = Problem(path, 0, "<file>", "gzip-compressed data in a file not named *.gz "
                                                           "(name it .jsonl.gz to read it)")
                            stats.problems.append(p)
                            yield None, p, b""
                            break
                        raw = raw.removeprefix(_BOM)  # a UTF-8 byte order mark is not part of the record
                    if not raw.strip():
                        stats.blank += 1
                        continue
                nonblank_in_file += 1
                stats.records += 1
                problem, rec = _parse_line(raw, length, max_line_bytes, lam=lam, group_size=group_size)
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


def _parse_line(raw: Optional[bytes], length: int, max_line_bytes: int, *, lam: float, group_size: int):
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
    problem = check_record(rec, lam=lam, group_size=group_size)
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
    lam: float = 0.0,
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
        from clp_ray.output_guard import check_outputs

        check_outputs({"the rejects file": rejects_path},
                      {**{f"data {p}": resolve_path(p) for p in paths}, **{f"data file {f}": f for f in files}})
    log.info("training data: %d file(s): %s", len(files), ", ".join(files))
    stats = _ScanStats()
    kw = {"lam": lam, "group_size": group_size, "max_line_bytes": max_line_bytes, "on_duplicate": on_duplicate}
    report = ValidationReport(files=files)
    if on_bad_record == "skip" and rejects_path is not None:
        with atomic_path(rejects_path) as tmp, open(tmp, "w", encoding="utf-8") as sink:
            rejects = _Rejects(sink, Path(rejects_path))
            for _, p, raw in _scan(files, stats, spill=rejects.spill, **kw):
                if p is not None:
                    rejects.write(p, raw)
        report.rejects_path = str(rejects_path)
    else:
        for _ in _scan(files, stats, **kw):
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


# --------------------------------------------------------------------------------------------
# Loading through Hugging Face datasets.


def _good_records(files: list[str], lam: float, group_size: int, max_line_bytes: int, content_hash: str,
                  on_duplicate: str = "keep"):
    # content_hash is unused here but part of the arguments, so datasets' cache key changes with
    # the data's bytes and never serves a stale Arrow file.
    for rec, _, _ in _scan(files, _ScanStats(), lam=lam, group_size=group_size, max_line_bytes=max_line_bytes,
                           on_duplicate=on_duplicate):
        if rec is not None:
            yield normalize_record(rec)


def _features():

    string, floats = datasets.Value("string"), datasets.Sequence(datasets.Value("float32"))
    strings = datasets.Sequence(string)
    return datasets.Features({"query": string, "pos": strings, "neg": strings, "neg_q": strings,
                              "pos_scores": floats, "neg_scores": floats})


def load_records(report: ValidationReport, *, lam: float, group_size: int, max_line_bytes: int, cache_dir: Optional[str] = None):
    """The good records of a validated report as a memory-mapped ``datasets.Dataset`` (cached by
    the data's content hash)."""

    return datasets.Dataset.from_generator(
        _good_records,
        # A tuple: datasets would split a list into shards scanned apart, and duplicates across
        # files would no longer be seen as such.
        gen_kwargs={"files": tuple(report.files), "lam": lam, "group_size": group_size, "max_line_bytes": max_line_bytes,
                    "content_hash": report.content_hash, "on_duplicate": getattr(report, "on_duplicate", "keep")},
        features=_features(),
        cache_dir=cache_dir,
    )


def _seeded_fraction(seed: int, text: str) -> float:
    return int(hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def split_train_dev(ds, fraction: float, seed: int, by: str = "queries"):
    """Carve a dev split from the training records, deterministically (seeded hashes).

    ``by="queries"``: a record goes to dev when the hash of its query falls under ``fraction``
    (query-disjoint; a dev query's positive may be another training query's positive).
    ``by="documents"``: a positive passage is a dev document when its hash falls under
    ``fraction``; records whose positives are all dev documents form the dev split, records with
    none of them train, and the few with both are left out (counted in the log), so no dev
    positive is ever a training positive — the dev metric then predicts a test set of unseen
    documents instead of rewarding memorised ones.
    """
    if by not in ("queries", "documents"):
        raise ValueError(f"dev split must be by 'queries' or 'documents', got {by!r}")
    if fraction <= 0:
        return ds, ds.select([])
    if by == "queries":
        flags = [_seeded_fraction(seed, q) < fraction for q in ds["query"]]
        dev_idx = [i for i, f in enumerate(flags) if f]
        train_idx = [i for i, f in enumerate(flags) if not f]
    else:
        dev_idx, train_idx, mixed = [], [], 0
        for i, pos in enumerate(ds["pos"]):
            dev = [_seeded_fraction(seed, p) < fraction for p in pos]
            if all(dev):
                dev_idx.append(i)
            elif not any(dev):
                train_idx.append(i)
            else:
                mixed += 1
        if mixed:
            log.info("document-disjoint dev split: %d record(s) with positives on both sides left out", mixed)
    if not train_idx or not dev_idx:
        raise DataError(f"data.dev_fraction = {fraction} (data.dev_split = {by}) leaves an empty "
                        f"{'train' if not train_idx else 'dev'} split ({len(ds)} records)")
    return ds.select(train_idx), ds.select(dev_idx)


def dev_retrieval_set(dev_ds):
    """A retrieval set from held-out CLP records: their queries, and a corpus of all their
    positives and negatives (the positives are the relevant documents)."""

    corpus: dict[str, str] = {}
    ids: dict[str, str] = {}

    def doc_id(text: str) -> str:
        if text not in ids:
            ids[text] = f"d{len(ids)}"
            corpus[ids[text]] = text
        return ids[text]

    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for i, rec in enumerate(dev_ds):
        qid = f"q{i}"
        queries[qid] = rec["query"]
        qrels[qid] = {doc_id(t): 1 for t in rec["pos"]}
        for t in rec["neg"]:
            doc_id(t)
    return RetrievalSet(corpus=corpus, queries=queries, qrels=qrels, name="dev")


# --------------------------------------------------------------------------------------------
# Groups, shards, batches.


@dataclass
class Group:
    query: str
    passages: list[str]  # positive first, then group_size - 1 negatives
    neg_queries: list[str]  # aligned with passages[1:]


def sample_group(rec: dict, group_size: int, *, seed: int, epoch: int, index: int) -> Group:
    """One positive and ``group_size - 1`` negatives (with their own ``neg_q``), sampled without
    replacement when there are enough negatives, with replacement otherwise. Deterministic in
    (seed, epoch, index)."""
    rng = random.Random(f"{seed}/{epoch}/{index}")
    pos = rec["pos"][rng.randrange(len(rec["pos"]))]
    k = group_size - 1
    negs = rec["neg"]
    if k == 0:
        picks: list[int] = []
    elif len(negs) >= k:
        picks = rng.sample(range(len(negs)), k)
    else:
        picks = [rng.randrange(len(negs)) for _ in range(k)]
    neg_q = rec.get("neg_q") or []
    return Group(rec["query"], [pos] + [negs[j] for j in picks], [neg_q[j] for j in picks] if neg_q else [])


def shard_indices(n: int, *, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """This rank's share of a seeded per-epoch permutation: every example lands on exactly one rank."""
    perm = list(range(n))
    random.Random(f"{seed}/shuffle/{epoch}").shuffle(perm)
    return perm[rank::world]


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Batches each rank runs per epoch; equal on all ranks (the longest shard, rounded up)."""
    return math.ceil(math.ceil(n / world) / batch_size)


def rank_batches(n: int, *, rank: int, world: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one rank and epoch. All ranks get the same number of full batches (needed
    for cross-device negatives and lock-step optimizer steps): a shorter shard's last batch wraps
    around to the start of that shard, so examples repeat only there."""
    idx = shard_indices(n, rank=rank, world=world, seed=seed, epoch=epoch)
    steps = steps_per_epoch(n, world, batch_size)
    need = steps * batch_size
    if not idx:
        raise DataError(f"{n} training records cannot feed {world} workers")
    padded = (idx * (need // len(idx) + 1))[:need]
    return [padded[i : i + batch_size] for i in range(0, need, batch_size)]


@dataclass
class Bucketed:
    """Texts tokenized into length-sorted sub-batches, each padded only to its own longest text.

    ``chunks[k]`` holds ``input_ids``/``attention_mask`` of consecutive texts in length order;
    ``inverse[i]`` is the row of text ``i`` in the concatenated chunk outputs. Padding a batch of
    B*G passages to its single longest one wastes about half the compute on typical data; sorting
    into buckets cuts that waste while every text still goes through the same model.
    """

    chunks: list[dict]
    inverse: Any  # LongTensor [N]

    def to(self, device) -> Bucketed:
        return Bucketed([{k: v.to(device) for k, v in c.items()} for c in self.chunks], self.inverse.to(device))

    @property
    def num_tokens(self) -> int:
        return sum(int(c["attention_mask"].sum()) for c in self.chunks)

    def __len__(self) -> int:
        return int(self.inverse.shape[0])


class Collator:
    """Tokenizes a list of groups into query, passage and negative-query batches.

    Queries and negative queries get ``query_prefix`` and ``query_max_len``, passages
    ``passage_prefix`` and ``passage_max_len`` — the model's own settings, as in evaluation
    (:meth:`for_embedder`). ``bucket_size`` > 0 returns :class:`Bucketed` batches (length-sorted
    sub-batches of that many texts); 0 returns plain padded ``input_ids``/``attention_mask`` dicts.
    """

    def __init__(self, tokenizer, query_max_len: int, passage_max_len: int, bucket_size: int = 0, *,
                 query_prefix: str = "", passage_prefix: str = ""):
        self.tokenizer = tokenizer
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.bucket_size = bucket_size
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix

    @classmethod
    def for_embedder(cls, embedder, bucket_size: int = 0) -> Collator:
        s = embedder.settings
        return cls(embedder.tokenizer, s.query_max_len, s.passage_max_len, bucket_size,
                   query_prefix=s.query_prefix, passage_prefix=s.passage_prefix)

    def _tok(self, texts: list[str], max_len: int, prefix: str = ""):
        if prefix:
            texts = [prefix + t for t in texts]
        if not self.bucket_size:
            return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                                       return_tensors="pt", return_token_type_ids=False))

        enc = self.tokenizer(texts, truncation=True, max_length=max_len, return_token_type_ids=False,
                             return_attention_mask=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
        chunks = []
        for start in range(0, len(order), self.bucket_size):
            part = [{"input_ids": enc[i]} for i in order[start : start + self.bucket_size]]
            chunks.append(dict(self.tokenizer.pad(part, return_tensors="pt", return_attention_mask=True)))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return Bucketed(chunks, inverse)

    def __call__(self, groups: list[Group]) -> dict[str, Any]:
        batch = {
            "query": self._tok([g.query for g in groups], self.query_max_len, self.query_prefix),
            "passage": self._tok([p for g in groups for p in g.passages], self.passage_max_len, self.passage_prefix),
            "group_size": len(groups[0].passages),
        }
        neg_q = [q for g in groups for q in g.neg_queries]
        batch["neg_query"] = self._tok(neg_q, self.query_max_len, self.query_prefix) if neg_q else None
        return batch


# --------------------------------------------------------------------------------------------
# Command line.


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clp_ray.data", description="Validate CLP training JSONL files.")
    ap.add_argument("paths", nargs="+", help="JSONL files (.jsonl, .jsonl.gz) or folders (local or fsspec URLs)")
    ap.add_argument("--lam", type=float, default=0.0, help="loss.lam of the training run (> 0 requires neg_q)")
    ap.add_argument("--group-size", type=int, default=2, help="data.train_group_size (> 1 requires negatives)")
    ap.add_argument("--max-line-bytes", type=int, default=1_000_000)
    ap.add_argument("--on-bad-record", choices=("error", "skip"), default="skip",
                    help="error: stop at the first 20 problems; skip (default): report every bad record")
    ap.add_argument("--rejects", metavar="PATH", help="with skip: write each rejected line, bytes included, here")
    ap.add_argument("--on-duplicate", choices=DUPLICATE_POLICIES, default="keep",
                    help="records identical to an earlier one: keep (counted), drop, or error (bad records)")
    ap.add_argument("--all", action="store_true", help="list every problem, not only the first 20")
    args = ap.parse_args(argv)
    if args.rejects and args.on_bad_record != "skip":
        ap.error("--rejects needs --on-bad-record skip")
    try:
        report = validate(args.paths, lam=args.lam, group_size=args.group_size, max_line_bytes=args.max_line_bytes,
                          on_bad_record=args.on_bad_record, rejects_path=args.rejects, on_duplicate=args.on_duplicate)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # an output that would overwrite an input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text(limit=None if args.all else MAX_LISTED))
    print(f"content hash: {report.content_hash}")
    return 0 if report.bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
