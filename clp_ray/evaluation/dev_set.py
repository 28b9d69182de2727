"""The dev set that selection runs on: what ASHA prunes on, what picks a sweep's best trial and
what a training run reports.

It is always searched against the **full** evaluation corpus, never against the few passages of
the dev queries' own records (a corpus of ~200 passages, where every trial scores 0.91-0.94 and
the trials' differences are noise). ``eval.dev_source`` says where its queries come from:

- ``qrels``: the evaluation set's ``qrels/<eval.dev_split>.tsv`` (the bundled samples have one),
  over its corpus; all training records train.
- ``heldout``: queries held out of the training records (``data.dev_fraction``,
  ``data.dev_split``), over the evaluation corpus plus every training passage (a passage is one
  document however often it occurs); the held-out records do not train.
- ``auto`` (default): ``qrels`` when the evaluation set has a dev split other than its test split,
  else ``heldout``.

Either way a dev query whose text is a training query is left out (counted), and the test split
never feeds selection. ``eval.dev_corpus_sample: N`` searches a seeded subsample instead (every
judged passage plus N others), for corpora too large to search at every evaluation; its size is
recorded. The driver builds the set once; the workers receive it in their payload.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from clp_ray.config import ExperimentConfig, resolve_path
from clp_ray.data import split_train_dev
from clp_ray.errors import ConfigError, DataError
from clp_ray.evaluation import RetrievalSet, load_beir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevSetInfo:
    """What the dev set is, for the summary (``dev_set.*``), MLflow params and logs."""

    name: str
    source: str  # qrels | heldout
    queries: int
    corpus_size: int  # passages searched
    full_corpus_size: int  # passages in the corpus it was drawn from (= corpus_size unless sampled)
    sampled: bool
    skipped_queries: int  # dev queries left out because a training record has the same query text
    content_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_params(self) -> dict[str, Any]:
        return {f"dev_set.{k}": v for k, v in asdict(self).items()}

    def describe(self) -> str:
        sample = f" (a seeded sample of {self.full_corpus_size})" if self.sampled else ""
        return f"{self.name}: {self.queries} queries over {self.corpus_size} passages{sample}, source {self.source}"


@dataclass(frozen=True)
class DevSet:
    retrieval: RetrievalSet
    info: DevSetInfo


def resolve_dev_source(cfg: ExperimentConfig) -> str:
    """``eval.dev_source`` with ``auto`` decided: ``qrels`` or ``heldout``."""
    e = cfg.eval
    if e.dev_source == "qrels":
        if not e.data_dir:
            raise ConfigError(f"{cfg.cite('eval.dev_source')} needs eval.data_dir (its qrels/{e.dev_split}.tsv)")
        if e.dev_split == e.test_split:
            raise ConfigError(f"{cfg.cite('eval.dev_split')} is the test split ({cfg.cite('eval.test_split')}): "
                              "the test split never feeds selection; name another split or use eval.dev_source = heldout")
        return "qrels"
    if e.dev_source == "heldout":
        return "heldout"
    return "qrels" if _has_dev_qrels(cfg) else "heldout"


def _has_dev_qrels(cfg: ExperimentConfig) -> bool:
    e = cfg.eval
    if not e.data_dir or e.dev_split == e.test_split:
        return False
    if str(e.data_dir).startswith("miracl://"):
        return True  # MIRACL publishes its splits' qrels (dev, train); an absent one fails when loading
    return (Path(resolve_path(e.data_dir)) / "qrels" / f"{e.dev_split}.tsv").is_file()


def training_split(records, cfg: ExperimentConfig, source: Optional[str] = None):
    """(records that train, held-out records): all records train when the dev queries come from qrels."""
    if (source or resolve_dev_source(cfg)) == "qrels":
        return records, records.select([])
    d = cfg.data
    if d.dev_fraction <= 0:
        raise ConfigError(f"{cfg.cite('data.dev_fraction')} leaves no held-out queries for the dev set "
                          f"(eval.dev_source resolved to heldout: {cfg.cite('eval.data_dir')} has no "
                          f"qrels/{cfg.eval.dev_split}.tsv); set data.dev_fraction > 0 or give dev qrels")
    return split_train_dev(records, d.dev_fraction, d.seed, by=d.dev_split)


def build_dev_set(cfg: ExperimentConfig, train_ds, heldout_ds, source: Optional[str] = None) -> DevSet:
    """The dev set for ``cfg`` (see the module doc); ``train_ds``/``heldout_ds`` from :func:`training_split`."""
    source = source or resolve_dev_source(cfg)
    trained = {q.strip() for q in train_ds["query"]}
    data = _from_qrels(cfg) if source == "qrels" else _from_heldout(cfg, train_ds, heldout_ds)
    data, skipped = _without_trained_queries(data, trained)
    full = len(data.corpus)
    if cfg.eval.dev_corpus_sample is not None:
        data = sample_corpus(data, cfg.eval.dev_corpus_sample, cfg.data.seed)
    info = DevSetInfo(data.name, source, len(data.queries), len(data.corpus), full, len(data.corpus) < full, skipped,
                      data.content_hash())
    log.info("dev set %s%s", info.describe(),
             f"; {skipped} dev queries left out (the same text is a training query)" if skipped else "")
    return DevSet(data, info)


def _from_qrels(cfg: ExperimentConfig) -> RetrievalSet:
    e = cfg.eval
    data = load_beir(e.data_dir, e.dev_split, miracl_root=e.miracl_root)
    return RetrievalSet(data.corpus, data.queries, data.qrels, name=f"{data.name} (full corpus)")


def _from_heldout(cfg: ExperimentConfig, train_ds, heldout_ds) -> RetrievalSet:
    """Held-out records' queries over the evaluation corpus plus every training passage; a
    passage text found in the corpus keeps its corpus id (under every id it has there). Texts are
    compared as the corpus loader keeps them, without surrounding whitespace."""
    corpus: dict[str, str] = {}
    if cfg.eval.data_dir:
        corpus = dict(load_beir(cfg.eval.data_dir, cfg.eval.test_split, miracl_root=cfg.eval.miracl_root).corpus)
    ids: dict[str, list[str]] = {}
    for doc_id, text in corpus.items():
        ids.setdefault(text.strip(), []).append(doc_id)

    def ids_of(text: str) -> list[str]:
        key = text.strip()
        if key not in ids:
            doc_id = f"train-passage-{len(ids)}"
            while doc_id in corpus:
                doc_id += "+"
            corpus[doc_id] = text
            ids[key] = [doc_id]
        return ids[key]

    for ds in (train_ds, heldout_ds):
        for pos, neg in zip(ds["pos"], ds["neg"]):
            for text in (*pos, *neg):
                ids_of(text)
    queries, qrels = {}, {}
    for i, (query, pos) in enumerate(zip(heldout_ds["query"], heldout_ds["pos"])):
        queries[f"heldout-{i}"] = query
        qrels[f"heldout-{i}"] = {doc_id: 1 for text in pos for doc_id in ids_of(text)}
    if not queries:
        raise DataError("the held-out dev split is empty: raise data.dev_fraction or give dev qrels (eval.dev_source)")
    return RetrievalSet(corpus, queries, qrels, name="heldout records (eval corpus + training passages)")


def _without_trained_queries(data: RetrievalSet, trained: set[str]) -> tuple[RetrievalSet, int]:
    keep = {q: t for q, t in data.queries.items() if t.strip() not in trained}
    skipped = len(data.queries) - len(keep)
    if not keep:
        raise DataError(f"dev set {data.name}: every one of its {len(data.queries)} queries is also a training query")
    if not skipped:
        return data, 0
    return RetrievalSet(data.corpus, keep, {q: data.qrels[q] for q in keep}, name=data.name), skipped


def sample_corpus(data: RetrievalSet, others: int, seed: int) -> RetrievalSet:
    """Every judged passage plus ``others`` more drawn with ``seed``, in corpus order."""
    judged = {d for rel in data.qrels.values() for d in rel}
    rest = [d for d in data.corpus if d not in judged]
    drawn = set(random.Random(seed).sample(rest, min(others, len(rest))))
    corpus = {d: t for d, t in data.corpus.items() if d in judged or d in drawn}
    return RetrievalSet(corpus, data.queries, data.qrels, name=f"{data.name.removesuffix(' (full corpus)')} "
                                                                f"(sample of {len(corpus)} passages)")


def dev_retrieval_set(dev_ds):
    """A retrieval set from held-out CLP records: their queries, and a corpus of only their own
    positives and negatives (the positives are the relevant documents). Selection no longer runs
    on it (too small and too easy to tell trials apart); benchmarks/dev_selection.py compares it."""

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
