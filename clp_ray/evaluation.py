"""Retrieval evaluation: encode, exact top-k search over the full corpus, IR metrics.

``mode`` picks how a pair is scored: ``dense`` (the default), or, for models with BGE-M3's heads,
``sparse``, ``colbert`` or ``hybrid`` (:mod:`clp_ray.m3_search`); :func:`evaluate_modes` scores
several modes from one encoding pass.

Metrics come from ``ir_measures`` (pytrec_eval underneath), never from hand-written formulas:
nDCG@10, nDCG@5 (the CLP paper's metric), Recall@100 and MRR@10, with per-query scores kept for
paired significance tests (:func:`compare`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ir_measures
import torch
from tqdm.auto import tqdm

from clp_ray import miracl
from clp_ray.atomic import atomic_path, write_json
from clp_ray.config import resolve_path
from clp_ray.errors import DataError
from clp_ray.m3 import check_modes
from clp_ray.m3_search import EVAL_MODES, ModeReps, exact_mode_search, merge_topk, mode_weights, modes_for, rerank_search
from clp_ray.unicode_text import SURROGATE, is_valid_text

log = logging.getLogger(__name__)

# Our metric names -> ir_measures measures.
METRICS = {"ndcg@10": "nDCG@10", "ndcg@5": "nDCG@5", "recall@100": "R@100", "mrr@10": "RR@10"}


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


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]  # metric -> query id -> score
    run: dict[str, dict[str, float]] = field(repr=False, default_factory=dict)  # qid -> docid -> score
    num_queries: int = 0
    num_docs: int = 0


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
    ``miracl://<lang>`` (MIRACL's published files under ``miracl_root``, see :mod:`clp_ray.miracl`).

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


# --------------------------------------------------------------------------------------------
# Search and metrics.


def exact_search(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, *, chunk_size: int = 4096, query_chunk: int = 1024,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search over the full corpus, in blocks.

    Memory is bounded by ``query_chunk x (chunk_size + k)`` scores whatever the corpus size.
    Returns (scores [Q, k'], indices [Q, k']) with k' = min(k, N), sorted by descending score.
    """
    n = corpus.shape[0]
    k = min(k, n)
    all_scores, all_idx = [], []
    starts = range(0, queries.shape[0], query_chunk)
    if show_progress:

        starts = tqdm(starts, desc="search", unit="query block")
    for qs in starts:
        q = queries[qs : qs + query_chunk]
        best_s = torch.full((q.shape[0], 0), -math.inf, dtype=torch.float32)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for cs in range(0, n, chunk_size):
            best_s, best_i = merge_topk(best_s, best_i, (q @ corpus[cs : cs + chunk_size].T).float(), cs, k)
        all_scores.append(best_s)
        all_idx.append(best_i)
    return torch.cat(all_scores), torch.cat(all_idx)


def score_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query metrics of a run through ir_measures. Queries missing from the run
    score 0 (ir_measures would silently skip them)."""

    measures = {name: ir_measures.parse_measure(m) for name, m in METRICS.items()}
    by_measure = {m: name for name, m in measures.items()}
    per_query: dict[str, dict[str, float]] = {name: {q: 0.0 for q in qrels} for name in METRICS}
    for row in ir_measures.iter_calc(list(measures.values()), qrels, run):
        per_query[by_measure[row.measure]][row.query_id] = float(row.value)
    means = {name: (sum(v.values()) / len(v) if v else 0.0) for name, v in per_query.items()}
    return means, per_query


def write_trec_run(path: str | os.PathLike, run: dict[str, dict[str, float]], tag: str = "clp-ray") -> Path:
    """The run in TREC format. Scores are written in full (shortest round-trip form): rounded ones
    tie where the scores did not, and a tool re-scoring the file would then rank those documents
    differently from the metrics reported here."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for qid in sorted(run):
            ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (did, score) in enumerate(ranked, 1):
                f.write(f"{qid} Q0 {did} {rank} {float(score)!r} {tag}\n")
    return Path(path)


def evaluate(
    embedder,
    data: RetrievalSet,
    *,
    batch_size: int = 64,
    chunk_size: int = 4096,
    top_k: int = 100,
    run_file: Optional[str | os.PathLike] = None,
    show_progress: bool = False,
    mode: str = "dense",
    hybrid_weights: Optional[dict[str, float]] = None,
    rerank_depth: Optional[int] = None,
) -> EvalResult:
    """Encode ``data``'s corpus and queries with ``embedder``, search the full corpus exactly in
    ``mode`` and score with ir_measures. The training loop calls this for its periodic dev metric."""
    res = evaluate_modes(embedder, data, [mode], batch_size=batch_size, chunk_size=chunk_size, top_k=top_k,
                         show_progress=show_progress, hybrid_weights=hybrid_weights, rerank_depth=rerank_depth)[mode]
    if run_file:
        write_trec_run(run_file, res.run)
    return res


def evaluate_config(embedder, data: RetrievalSet, e, **kwargs) -> EvalResult:
    """:func:`evaluate` with an :class:`~clp_ray.config.EvalConfig`'s settings (``eval.*``)."""
    return evaluate(embedder, data, batch_size=e.batch_size, chunk_size=e.chunk_size, top_k=e.top_k, mode=e.mode,
                    hybrid_weights=e.hybrid_weights.model_dump(), rerank_depth=e.rerank_depth, **kwargs)


def evaluate_sets(embedder, sets: list[RetrievalSet], e, **kwargs) -> list[EvalResult]:
    """:func:`evaluate_config` on each of ``sets``; sets over one corpus (the dev and test splits of
    one evaluation set) share one corpus encoding and search, each scored on its own queries."""
    if len(sets) < 2 or any(s.corpus != sets[0].corpus for s in sets[1:]):
        return [evaluate_config(embedder, s, e, **kwargs) for s in sets]
    queries = {f"{i}:{q}": t for i, s in enumerate(sets) for q, t in s.queries.items()}
    qrels = {f"{i}:{q}": r for i, s in enumerate(sets) for q, r in s.qrels.items()}
    both = evaluate_config(embedder, RetrievalSet(sets[0].corpus, queries, qrels, name="+".join(s.name for s in sets)),
                           e, **kwargs)
    out = []
    for i, s in enumerate(sets):
        run = {q: both.run[f"{i}:{q}"] for q in s.queries}
        means, per_query = score_run(s.qrels, run)
        out.append(EvalResult(means, per_query, run, num_queries=len(s.queries), num_docs=both.num_docs))
    return out


def model_eval_modes(embedder) -> list[str]:
    """Every evaluation mode ``embedder`` has: dense, plus sparse, colbert and hybrid with BGE-M3's heads."""
    return [m for m in EVAL_MODES if m == "dense" or embedder.heads is not None]


def evaluate_modes(
    embedder, data: RetrievalSet, modes: list[str], *, batch_size: int = 64, chunk_size: int = 4096, top_k: int = 100,
    show_progress: bool = False, hybrid_weights: Optional[dict[str, float]] = None, rerank_depth: Optional[int] = None,
) -> dict[str, EvalResult]:
    """:func:`evaluate` for each of ``modes`` from one encoding of the corpus and queries.

    ``rerank_depth`` (None: exact search of the full corpus in every mode): sparse, ColBERT and
    hybrid scores re-rank each query's dense top-``rerank_depth`` instead, and only those passages
    are encoded in the other modes (exact ColBERT search holds every passage's token vectors)."""
    for m in modes:
        mode_weights(m, hybrid_weights)  # an unknown mode fails here, before any encoding
    need = check_modes(modes_for(modes), embedder.heads is not None)
    doc_ids, qids = list(data.corpus), list(data.queries)
    if not qids:
        raise DataError(f"{data.name}: no queries to evaluate")
    docs, queries = [data.corpus[i] for i in doc_ids], [data.queries[i] for i in qids]
    enc = {"batch_size": batch_size, "show_progress": show_progress}
    weights = {m: mode_weights(m, hybrid_weights) for m in modes}
    if need == ("dense",):  # the common case: plain tensors, no per-mode bookkeeping
        d = embedder.encode(docs, kind="passage", desc="encode corpus", **enc)
        q = embedder.encode(queries, kind="query", desc="encode queries", **enc)
        found = {m: exact_search(q, d, top_k, chunk_size=chunk_size) for m in modes}
    elif rerank_depth is None:
        q_reps = _reps(embedder, queries, "query", need, "encode queries", enc)
        d_reps = _reps(embedder, docs, "passage", need, "encode corpus", enc)
        found = {m: exact_mode_search(q_reps, d_reps, w, top_k, chunk_size=chunk_size) for m, w in weights.items()}
    else:
        found = _reranked(embedder, queries, docs, need, weights, rerank_depth, top_k, chunk_size, enc)
    return {m: _scored(data, qids, doc_ids, *found[m]) for m in modes}


def _reps(embedder, texts: list[str], kind: str, modes: tuple[str, ...], desc: str, enc: dict) -> ModeReps:
    return ModeReps.from_encoding(embedder.encode(texts, kind=kind, output=modes, desc=desc, **enc),
                                  int(embedder.encoder.config.vocab_size))


def _reranked(embedder, queries: list[str], docs: list[str], need: tuple[str, ...], weights: dict, depth: int,
              top_k: int, chunk_size: int, enc: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per mode (scores, corpus indices): dense exact, the others re-ranking the dense top ``depth``
    (only those passages encoded in the other modes)."""
    q_reps = _reps(embedder, queries, "query", tuple(dict.fromkeys(("dense", *need))), "encode queries", enc)
    dense_docs = embedder.encode(docs, kind="passage", desc="encode corpus (dense)", **enc)
    _, cand = exact_search(q_reps.dense, dense_docs, depth, chunk_size=chunk_size)
    pool = sorted(set(cand.flatten().tolist()))
    where = {j: n for n, j in enumerate(pool)}
    d_reps = _reps(embedder, [docs[j] for j in pool], "passage", need, "encode candidates", enc)
    local = torch.tensor([[where[j] for j in row] for row in cand.tolist()], dtype=torch.long)
    found = {}
    for m, w in weights.items():
        if m == "dense":
            found[m] = exact_search(q_reps.dense, dense_docs, top_k, chunk_size=chunk_size)
        else:
            s, i = rerank_search(q_reps, d_reps, local, w, top_k)
            found[m] = (s, torch.as_tensor(pool)[i])
    return found


def _scored(data: RetrievalSet, qids: list[str], doc_ids: list[str], scores: torch.Tensor, idx: torch.Tensor) -> EvalResult:
    run = {qid: {doc_ids[j]: float(s) for s, j in zip(srow.tolist(), irow.tolist())}
           for qid, srow, irow in zip(qids, scores, idx)}
    means, per_query = score_run(data.qrels, run)
    return EvalResult(means, per_query, run, num_queries=len(qids), num_docs=len(doc_ids))


def save_result(res: EvalResult, path: str | os.PathLike) -> Path:
    """Metrics and per-query scores (not the run) as JSON, atomically."""

    return write_json(path, {"metrics": res.metrics, "per_query": res.per_query, "num_queries": res.num_queries,
                             "num_docs": res.num_docs})


def load_result(path: str | os.PathLike) -> Optional[EvalResult]:
    """A result :func:`save_result` wrote, or None when there is none (or it is unreadable)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return EvalResult(d["metrics"], d["per_query"], num_queries=d["num_queries"], num_docs=d["num_docs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Comparison:
    metric: str
    mean_a: float
    mean_b: float
    diff: float
    p_value: float
    num_queries: int


def paired_p_value(a: dict[str, float], b: dict[str, float]) -> float:
    """Two-sided paired t-test (scipy) of per-query scores ``a`` against ``b`` over the same queries;
    1 when they are equal on every query (the t statistic is undefined there)."""
    if set(a) != set(b):
        raise DataError("the two evaluations do not cover the same queries")
    qids = sorted(a)
    xa, xb = [a[q] for q in qids], [b[q] for q in qids]
    if xa == xb:
        return 1.0
    # Local: scipy.stats costs ~0.6 s to import, and every Train worker imports this module
    # for its dev evaluation but never compares two runs.
    from scipy import stats

    p = float(stats.ttest_rel(xa, xb).pvalue)
    return 1.0 if math.isnan(p) else p


def compare(a: EvalResult, b: EvalResult, metric: str = "ndcg@10") -> Comparison:
    """Means of ``metric`` and :func:`paired_p_value` on the per-query scores of the same queries."""
    qa, qb = a.per_query[metric], b.per_query[metric]
    p = paired_p_value(qa, qb)
    ma, mb = sum(qa.values()) / len(qa), sum(qb.values()) / len(qb)
    return Comparison(metric, ma, mb, mb - ma, p, len(qa))


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
