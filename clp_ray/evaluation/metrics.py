"""IR metrics through ``ir_measures`` (pytrec_eval underneath), never hand-written formulas: nDCG@10,
nDCG@5 (the CLP paper's metric), Recall@100 and MRR@10, per-query scores kept for paired
significance tests (:func:`compare`), TREC run files."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ir_measures

from clp_ray.errors import DataError
from clp_ray.util.atomic import atomic_path, write_json

# Our metric names -> ir_measures measures.
METRICS = {"ndcg@10": "nDCG@10", "ndcg@5": "nDCG@5", "recall@100": "R@100", "mrr@10": "RR@10"}


@dataclass
class EvalResult:
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]  # metric -> query id -> score
    run: dict[str, dict[str, float]] = field(repr=False, default_factory=dict)  # qid -> docid -> score
    num_queries: int = 0
    num_docs: int = 0


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
