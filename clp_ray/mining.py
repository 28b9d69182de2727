"""Build CLP training data: ANCE-style hard-negative mining and negative-query assignment.

For every training query: retrieve the top-k passages with exact search, drop the query's
positives, keep candidates ranked inside ``mining.rank_window`` that pass the false-negative guard
(not scoring within ``margin`` of the best positive), and sample ``negatives_per_query`` of them
with a seed. Each negative's own query (``neg_q``) is a judged query it is relevant to when the
qrels know one; otherwise the generator writes one (an OpenAI-compatible chat endpoint, cached on
disk) or, with ``generator.kind: none``, the negative is dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import ray.data
import torch
from tqdm.auto import tqdm

from clp_ray.config import GeneratorConfig, MiningConfig
from clp_ray.errors import ClpRayError
from clp_ray.evaluation import exact_search
from clp_ray.tracking.model_refs import load_model_ref
from clp_ray.util.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass
class MiningStats:
    queries: int = 0
    written: int = 0
    skipped_no_negatives: int = 0
    negatives: int = 0
    neg_q_from_qrels: int = 0
    neg_q_generated: int = 0
    negatives_dropped: int = 0  # no known query and no generator (or generation failed)
    candidates_guarded: int = 0  # skipped by the false-negative margin
    candidates_same_text: int = 0  # skipped: the same text as a positive, under another corpus id
    generator_requests: int = 0
    generator_cache_hits: int = 0
    generator_failures: int = 0  # passages the generator wrote no query for

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["negatives_per_query"] = self.negatives / self.written if self.written else 0.0
        return d


def select_negatives(
    scores: list[float], doc_ids: list[str], positives: dict[str, int], pos_score: float, cfg: MiningConfig,
    rng: random.Random,
) -> tuple[list[str], int]:
    """Negatives for one query from its ranked list (best first). Returns (negatives, guarded count).

    A candidate scoring at or above ``limit`` is a likely false negative and skipped. Relative mode
    measures the margin on the positive's magnitude, ``limit = pos - |pos| * (1 - margin)``: for a
    positive score that is ``margin * pos``, and for a negative one it stays below the positive too
    (``margin * pos`` would lie *above* it and let better-scoring candidates through).
    """
    lo, hi = cfg.rank_window
    if cfg.margin_mode == "relative":
        limit = pos_score - abs(pos_score) * (1 - cfg.margin)
    else:
        limit = pos_score - cfg.margin
    guarded = 0
    candidates = []
    for rank, (doc, score) in enumerate(zip(doc_ids, scores), 1):
        if rank < lo or rank > hi or positives.get(doc, 0) > 0:
            continue
        if score >= limit:
            guarded += 1
            continue
        candidates.append(doc)
    k = min(cfg.negatives_per_query, len(candidates))
    return rng.sample(candidates, k), guarded


class QueryGenerator:
    """OpenAI-compatible chat-completions client: bounded concurrency, retries with exponential
    back-off, per-request timeouts, and a JSON-file cache on disk keyed by (model, prompt)."""

    def __init__(self, cfg: GeneratorConfig):
        self.cfg = cfg
        self.cache_dir = Path(cfg.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.api_key = os.environ.get(cfg.api_key_env, "")
        self.requests = 0
        self.cache_hits = 0
        self.failures = 0
        self._consecutive_failures = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # a fatal error: the passages still queued are not asked

    def _key(self, prompt: str) -> Path:
        digest = hashlib.sha256(f"{self.cfg.base_url}\0{self.cfg.model}\0{prompt}".encode()).hexdigest()
        return self.cache_dir / f"{digest}.json"

    def _request(self, prompt: str) -> str:
        body = json.dumps({"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{self.cfg.base_url.rstrip('/')}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
            data = json.loads(resp.read().decode())
        return data["choices"][0]["message"]["content"].strip()

    def generate(self, passage: str) -> Optional[str]:
        prompt = self.cfg.prompt.format(passage=passage)
        path = self._key(prompt)
        if self._stopped.is_set():
            return None
        cached = self._cached(path)
        if cached is not None:
            with self._lock:
                self.cache_hits += 1
            return cached
        last: Exception | None = None
        for attempt in range(self.cfg.max_retries + 1):
            try:
                with self._lock:
                    self.requests += 1
                query = self._request(prompt)
                if not query:
                    raise ValueError("empty completion")
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps({"query": query, "model": self.cfg.model}, ensure_ascii=False))
                with self._lock:
                    self._consecutive_failures = 0
                return query
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # retrying cannot help, and every passage would fail alike
                    self._stopped.set()
                    raise ClpRayError(f"query generator at {self.cfg.base_url} refused the request (HTTP {e.code}): "
                                      f"check ${self.cfg.api_key_env} and mining.generator.model") from None
                last = e
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError) as e:
                last = e
            if attempt < self.cfg.max_retries:
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
        log.warning("generator gave up after %d attempts: %s", self.cfg.max_retries + 1, last)
        with self._lock:
            self.failures += 1
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.cfg.max_consecutive_failures:
                self._stopped.set()
                raise ClpRayError(f"query generator at {self.cfg.base_url}: {self._consecutive_failures} passages in a "
                                  f"row got no query (last error: {last}); stopping instead of dropping their negatives")
        return None

    def _cached(self, path: Path) -> Optional[str]:
        """The cached answer, or None when there is none or the file is unreadable (then it is
        asked again and rewritten)."""
        if not path.exists():
            return None
        try:
            query = json.loads(path.read_text(encoding="utf-8"))["query"]
            if isinstance(query, str) and query.strip():
                return query
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.warning("generator cache entry %s is unreadable: asking again", path)
        return None

    def generate_many(self, passages: list[str], show_progress: bool = False) -> list[Optional[str]]:
        """A query per passage (None where generation failed), or :class:`ClpRayError` when the
        generator fails as a whole (see ``max_consecutive_failures``, ``max_failure_rate``)."""
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        try:
            it = pool.map(self.generate, passages)
            if show_progress:

                it = tqdm(it, total=len(passages), desc="generate neg_q", unit="query")
            out = list(it)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a fatal error, ask nothing more
        if passages and self.failures > self.cfg.max_failure_rate * len(passages):
            raise ClpRayError(f"query generator at {self.cfg.base_url}: {self.failures} of {len(passages)} passages got "
                              f"no query (more than mining.generator.max_failure_rate = {self.cfg.max_failure_rate})")
        return out


@dataclass
class _Planned:
    """One query's sampled negatives and their own queries (None: none known yet)."""

    qid: str
    negatives: list[str]
    neg_q: list[Optional[str]]


def mine(
    q_emb: torch.Tensor,
    d_emb: torch.Tensor,
    qids: list[str],
    doc_ids: list[str],
    queries: dict[str, str],
    corpus: dict[str, str],
    qrels: dict[str, dict[str, int]],
    cfg: MiningConfig,
    *,
    chunk_size: int = 4096,
    show_progress: bool = False,
    search: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[list[dict], MiningStats]:
    """CLP records from embeddings of the training queries (``qids``) and the corpus (``doc_ids``).
    ``search``: precomputed top-k (scores, indices), e.g. from :func:`search_with_ray_data`."""
    stats = MiningStats(queries=len(qids))
    scores, idx = search if search is not None else exact_search(q_emb, d_emb, cfg.top_k, chunk_size=chunk_size,
                                                                 show_progress=show_progress)
    doc_pos = {d: i for i, d in enumerate(doc_ids)}
    relevant_to: dict[str, list[str]] = {}
    for q, rels in qrels.items():
        for d, r in rels.items():
            if r > 0 and q in queries:
                relevant_to.setdefault(d, []).append(q)
    ids_by_text: dict[str, list[str]] = {}
    for d in doc_ids:
        ids_by_text.setdefault(corpus[d].strip(), []).append(d)
    plan: list[_Planned] = []
    for row, qid in enumerate(qids):
        positives = {d: r for d, r in qrels.get(qid, {}).items() if r > 0 and d in doc_pos}
        if positives:
            pos_score = max(float(q_emb[row] @ d_emb[doc_pos[d]]) for d in positives)
            ranked = [doc_ids[j] for j in idx[row].tolist()]
            # A passage whose text is a positive's, under another id, is that positive: never a negative.
            twins = {t for d in positives for t in ids_by_text[corpus[d].strip()]} - set(positives)
            lo, hi = cfg.rank_window
            stats.candidates_same_text += sum(d in twins for d in ranked[lo - 1:hi])
            plan.append(_plan_query(qid, scores[row].tolist(), ranked, {**positives, **dict.fromkeys(twins, 1)},
                                    pos_score, queries, relevant_to, cfg, stats))
    if cfg.generator.kind == "openai":
        _generate_missing(plan, corpus, cfg, stats, show_progress)
    return _records(plan, queries, corpus, qrels, doc_pos, stats), stats


def _plan_query(qid, scores, ranked, positives, pos_score, queries, relevant_to, cfg, stats) -> _Planned:
    """Sample the query's negatives; each one's ``neg_q`` is a judged query it is relevant to."""
    rng = random.Random(f"{cfg.seed}/{qid}")
    negs, guarded = select_negatives(scores, ranked, positives, pos_score, cfg, rng)
    stats.candidates_guarded += guarded
    neg_q: list[Optional[str]] = []
    for d in negs:
        owners = sorted(q for q in relevant_to.get(d, []) if q != qid and queries[q] != queries[qid])
        neg_q.append(queries[rng.choice(owners)] if owners else None)
        stats.neg_q_from_qrels += bool(owners)
    return _Planned(qid, negs, neg_q)


def _generate_missing(plan: list[_Planned], corpus, cfg: MiningConfig, stats: MiningStats, show_progress: bool) -> None:
    """Ask the generator for the negatives no judged query is relevant to."""
    missing = [(p, j) for p in plan for j, q in enumerate(p.neg_q) if q is None]
    if not missing:
        return
    gen = QueryGenerator(cfg.generator)
    written = gen.generate_many([corpus[p.negatives[j]] for p, j in missing], show_progress=show_progress)
    for (p, j), q in zip(missing, written):
        p.neg_q[j] = q
        stats.neg_q_generated += q is not None
    stats.generator_requests, stats.generator_cache_hits, stats.generator_failures = gen.requests, gen.cache_hits, gen.failures


def _records(plan, queries, corpus, qrels, doc_pos, stats: MiningStats) -> list[dict]:
    """CLP records of the planned queries, negatives without a ``neg_q`` dropped (and counted)."""
    records = []
    for p in plan:
        kept = [(d, q) for d, q in zip(p.negatives, p.neg_q) if q]
        stats.negatives_dropped += len(p.negatives) - len(kept)
        if not kept:
            stats.skipped_no_negatives += 1
            continue
        positives = [corpus[d] for d, r in sorted(qrels[p.qid].items()) if r > 0 and d in doc_pos]
        records.append({"query": queries[p.qid], "pos": positives, "neg": [corpus[d] for d, _ in kept],
                        "neg_q": [q for _, q in kept]})
        stats.negatives += len(kept)
    stats.written = len(records)
    return records


def write_records(records: list[dict], out: str | os.PathLike, stats: Optional[MiningStats] = None,
                  check: Optional[Callable[[Path], object]] = None) -> Path:
    """Write ``records`` to ``out`` atomically. ``check(temp file)`` runs before the rename and
    may raise: then the temp file is removed and a previous ``out`` stays as it was."""
    if not records:
        counts = ", ".join(f"{k} {v}" for k, v in (stats.to_dict() if stats else {}).items())
        raise ClpRayError(f"mining produced no records (no query kept a negative): {counts}; widen mining.rank_window, "
                          "lower mining.margin, or enable mining.generator")
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        if check is not None:
            check(tmp)
    return Path(out)


# --------------------------------------------------------------------------------------------
# Cluster scale: encoding and search as Ray Data batch jobs (an actor pool; GPUs when present).


class _EncodeActor:
    """Loads the model once per actor and embeds batches of texts."""

    def __init__(self, model_ref: str, kind: str, batch_size: int, model_cfg=None, tracking_uri=None):

        # The driver's model settings (explicit ones, ``tiny`` sizes) and MLflow store: the same
        # model, embedding the same way, as the driver's.
        self.embedder = load_model_ref(model_ref, model_cfg, tracking_uri=tracking_uri)
        if torch.cuda.is_available():
            self.embedder.to("cuda")
        self.kind = kind
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        vecs = self.embedder.encode(list(batch["text"]), batch_size=self.batch_size, kind=self.kind)
        return {"i": batch["i"], "vec": vecs.numpy()}


class _SearchActor:
    """Exact top-k of a batch of query vectors against the whole corpus (shared via the object store)."""

    def __init__(self, corpus, k: int, chunk_size: int):

        # Passed as an ObjectRef so the corpus is stored once in the object store, not per actor.
        self.corpus = torch.as_tensor(ray.get(corpus) if isinstance(corpus, ray.ObjectRef) else corpus)
        self.k = k
        self.chunk_size = chunk_size

    def __call__(self, batch: dict) -> dict:

        scores, idx = exact_search(torch.as_tensor(batch["vec"]), self.corpus, self.k, chunk_size=self.chunk_size)
        return {"i": batch["i"], "scores": scores.numpy(), "idx": idx.numpy()}


def _collect(ds, n: int, fields: tuple[str, ...]) -> dict:

    out: dict = {}
    for batch in ds.iter_batches(batch_format="numpy"):
        for f in fields:
            if f not in out:
                out[f] = np.zeros((n, *batch[f].shape[1:]), dtype=batch[f].dtype)
            out[f][batch["i"]] = batch[f]
    return out


def encode_with_ray_data(model_ref: str, texts: list[str], *, kind: str, batch_size: int = 64,
                         concurrency: int = 2, use_gpu: bool = False, model_cfg=None,
                         tracking_uri: Optional[str] = None) -> torch.Tensor:
    """Embed ``texts`` as ``kind`` (``query``/``passage``: its prefix and max length) with a pool of
    ``concurrency`` actors spread over the Ray cluster; rows come back in input order."""

    ds = ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)])
    out = ds.map_batches(_EncodeActor, fn_constructor_kwargs={"model_ref": model_ref, "kind": kind,
                                                              "batch_size": batch_size, "model_cfg": model_cfg,
                                                              "tracking_uri": tracking_uri},
                         batch_size=batch_size * 4, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
                         num_gpus=1 if use_gpu else 0)
    return torch.from_numpy(_collect(out, len(texts), ("vec",))["vec"])


def search_with_ray_data(q_emb: torch.Tensor, d_emb: torch.Tensor, k: int, *, chunk_size: int = 4096,
                         batch_size: int = 256, concurrency: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k for all queries, query batches spread over an actor pool."""

    corpus_ref = ray.put(d_emb.numpy())
    ds = ray.data.from_items([{"i": i, "vec": v} for i, v in enumerate(q_emb.numpy())])
    out = ds.map_batches(_SearchActor, fn_constructor_kwargs={"corpus": corpus_ref, "k": min(k, d_emb.shape[0]),
                                                              "chunk_size": chunk_size},
                         batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency))
    got = _collect(out, q_emb.shape[0], ("scores", "idx"))
    return torch.from_numpy(got["scores"]), torch.from_numpy(got["idx"])
