"""Encode a set's corpus and queries with an embedder, search exactly in one or more modes, score.

``mode`` picks how a pair is scored: ``dense`` (the default), or, for models with BGE-M3's heads,
``sparse``, ``colbert`` or ``hybrid`` (:mod:`clp_ray.evaluation.m3_search`); :func:`evaluate_modes`
scores several modes from one encoding pass."""

from __future__ import annotations

import os
from typing import Optional

import torch

from clp_ray.errors import DataError
from clp_ray.evaluation.m3_search import EVAL_MODES, ModeReps, exact_mode_search, mode_weights, modes_for, rerank_search
from clp_ray.evaluation.metrics import EvalResult, score_run, write_trec_run
from clp_ray.evaluation.search import exact_search
from clp_ray.evaluation.sets import RetrievalSet
from clp_ray.model.m3 import check_modes


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
