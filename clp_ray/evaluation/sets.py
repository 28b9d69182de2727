"""Retrieval sets: BEIR folders (corpus, queries, qrels) and MIRACL, loaded and checked."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from clp_ray.config import resolve_path
from clp_ray.data import miracl
from clp_ray.errors import DataError
from clp_ray.util.unicode_text import SURROGATE, is_valid_text

log = logging.getLogger(__name__)


@dataclass
class RetrievalSet:
    corpus: dict[str, str]  # doc id -> text (title and text joined)
    queries: dict[str, str]  # query id -> text (only queries that have qrels)
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> relevance
    name: str = ""

    def content_hash(self) -> str:
        """Identifies the evaluation set (corpus, queries and judgements) for lineage and for
        comparing models only on the same set."""
        h = hashlib.sha256()
        for part in (self.corpus, self.queries, self.qrels):
            h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading.


def _text_lines(path: Path):
    """``(line number, text)`` of each line, decoded one line at a time so that invalid UTF-8 is
    reported with its line instead of as a codec traceback from somewhere in the file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: invalid UTF-8 at byte {e.start}") from None


def _read_jsonl(path: Path, what: str, text_fields: tuple[str, ...]) -> dict[str, str]:
    """``{_id: text}`` from a BEIR JSONL file, the ``text_fields`` that are set joined by a space.

    A repeated ``_id`` with different text is an error (a dict would silently keep the last one);
    an exact repeat adds nothing and is accepted.
    """
    if not path.is_file():
        raise DataError(f"{path}: {what} file {'is not a regular file' if path.exists() else 'not found'}")
    rows: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON: {e.msg}") from None
        if not isinstance(row, dict) or "_id" not in row:
            raise DataError(f"{path}:{n}: _id: missing field")
        if not isinstance(row["_id"], (str, int)) or isinstance(row["_id"], bool):
            raise DataError(f"{path}:{n}: _id: expected a string or an integer, got {type(row['_id']).__name__}")
        for key in text_fields:
            if row.get(key) is not None and not isinstance(row[key], str):
                raise DataError(f"{path}:{n}: {key}: expected a string, got {type(row[key]).__name__}")
        doc_id = str(row["_id"])
        for key, value in (("_id", doc_id), *((k, row.get(k) or "") for k in text_fields)):
            if not is_valid_text(value):
                raise DataError(f"{path}:{n}: {key}: {SURROGATE}")
        text = " ".join(t for t in (row.get(key) or "" for key in text_fields) if t).strip()
        if doc_id in rows and rows[doc_id] != text:
            raise DataError(f"{path}:{n}: _id {doc_id!r} repeated with different text "
                            f"(first at line {first_line[doc_id]})")
        rows[doc_id] = text
        first_line.setdefault(doc_id, n)
    return rows


def load_beir(data_dir: str | os.PathLike, split: str = "test", *, miracl_root: Optional[str] = None) -> RetrievalSet:
    """Load a BEIR-layout folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``; or
    ``miracl://<lang>`` (MIRACL's published files under ``miracl_root``, see :mod:`clp_ray.data.miracl`).

    Only queries with judgements in the split are kept. Qrels naming unknown query or document
    ids are an error (with counts), as is an empty query set.
    """
    spec = str(data_dir)
    if spec.startswith("miracl://"):
        return load_miracl(spec.removeprefix("miracl://"), split, root=miracl_root)
    root = Path(resolve_path(spec))
    if not root.is_dir():
        raise DataError(f"{root}: evaluation data folder not found")
    qrels_file = root / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        known = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise DataError(f"{qrels_file}: qrels for split {split!r} not found (available: {', '.join(known) or 'none'})")
    return load_beir_files(root / "corpus.jsonl", root / "queries.jsonl", qrels_file, name=f"{root.name}/{split}")


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _grade(text: str) -> Optional[int]:
    """An integer relevance grade (``2``, ``2.0``); None for a fractional one (``0.5``)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"relevance {text!r} is not finite") from None
        return int(value) if value.is_integer() else None


def load_beir_files(corpus_file: str | os.PathLike, queries_file: str | os.PathLike, qrels_file: str | os.PathLike,
                    name: str = "") -> RetrievalSet:
    """BEIR-format files named one by one (``corpus.jsonl``, ``queries.jsonl``, a qrels TSV)."""
    corpus_file, queries_file, qrels_file = Path(corpus_file), Path(queries_file), Path(qrels_file)
    if not qrels_file.is_file():
        raise DataError(f"{qrels_file}: qrels file {'is not a regular file' if qrels_file.exists() else 'not found'}")
    corpus = _read_jsonl(corpus_file, "corpus", ("title", "text"))
    all_queries = _read_jsonl(queries_file, "queries", ("text",))
    qrels: dict[str, dict[str, int]] = {}
    unknown_q: set[str] = set()
    unknown_d: set[str] = set()
    conflicting: set[tuple[str, str]] = set()
    bad_rows = 0
    for n, line in _text_lines(qrels_file):
        parts = line.rstrip("\r\n").split("\t")
        if n == 1 and parts[0] in ("query-id", "qid"):
            continue
        if not line.strip():
            continue
        if len(parts) == 4:  # TREC qrels: qid iter docid rel
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            bad_rows += 1
            continue
        qid, did, rel = parts
        try:
            score = _grade(rel)
        except (ValueError, OverflowError):  # "inf" overflows
            bad_rows += 1
            continue
        if score is None:  # truncating 0.5 to 0 would turn a graded judgement into "not relevant"
            raise DataError(f"{qrels_file}:{n}: relevance {rel.strip()!r} is not an integer grade")
        if not -(2**31) <= score < 2**31:  # pytrec_eval keeps grades as C ints
            raise DataError(f"{qrels_file}:{n}: relevance {_short(rel.strip())} does not fit a 32-bit integer grade")
        if qid not in all_queries:
            unknown_q.add(qid)
        elif did not in corpus:
            unknown_d.add(did)
        elif qrels.setdefault(qid, {}).setdefault(did, score) != score:
            conflicting.add((qid, did))
    problems = []
    if bad_rows:
        problems.append(f"{bad_rows} malformed row(s) (expected query-id<TAB>corpus-id<TAB>score)")
    if unknown_q:
        problems.append(f"{len(unknown_q)} unknown query id(s), e.g. {sorted(unknown_q)[:3]}")
    if unknown_d:
        problems.append(f"{len(unknown_d)} unknown corpus id(s), e.g. {sorted(unknown_d)[:3]}")
    if conflicting:
        problems.append(f"{len(conflicting)} (query, document) pair(s) judged twice with different scores, "
                        f"e.g. {sorted(conflicting)[:3]}")
    # An empty query would still be encoded and scored, quietly dragging the metrics down.
    blank = sorted(q for q in qrels if not all_queries[q])
    if blank:
        problems.append(f"{len(blank)} judged query id(s) with empty text in {queries_file}, e.g. {blank[:3]}")
    if problems:
        raise DataError(f"{qrels_file}: " + "; ".join(problems))
    queries = {q: all_queries[q] for q in sorted(qrels)}
    if not queries:
        raise DataError(f"{qrels_file}: no queries to evaluate (empty qrels)")
    unjudged = sum(1 for rels in qrels.values() if not any(r > 0 for r in rels.values()))
    if unjudged:
        log.warning("%s: %s of %d queries have no relevant document (every grade <= 0): they score 0 on every "
                    "metric", qrels_file, "all" if unjudged == len(qrels) else unjudged, len(qrels))
    if not corpus:
        raise DataError(f"{corpus_file}: empty corpus")
    return RetrievalSet(corpus=corpus, queries=queries, qrels=qrels, name=name or qrels_file.stem)


def load_miracl(lang: str, split: str = "dev", *, root: Optional[str] = None) -> RetrievalSet:
    """MIRACL ``lang``/``split`` from its published files (the hub by default; ``root``: a folder
    or fsspec URL with the same layout). Fails with a clear message when it cannot be reached."""

    corpus, queries, qrels = miracl.load(lang, split, root or miracl.HUB_ROOT)
    return RetrievalSet(corpus=corpus, queries=queries, qrels=qrels, name=f"miracl-{lang}/{split}")
