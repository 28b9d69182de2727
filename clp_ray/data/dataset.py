"""The good records as a ``datasets.Dataset``, the train/dev split and a retrieval set from held-out records."""

from __future__ import annotations

import hashlib
import logging
from typing import Optional

import datasets

from clp_ray.data.records import normalize_record
from clp_ray.data.report import ValidationReport
from clp_ray.data.validation import ScanStats, scan_files
from clp_ray.errors import DataError

log = logging.getLogger(__name__)


def _good_records(files: list[str], require_neg_q: bool, group_size: int, max_line_bytes: int, content_hash: str,
                  on_duplicate: str = "keep"):
    # content_hash is unused here but part of the arguments, so datasets' cache key changes with
    # the data's bytes and never serves a stale Arrow file.
    for rec, _, _ in scan_files(files, ScanStats(), require_neg_q=require_neg_q, group_size=group_size, max_line_bytes=max_line_bytes,
                           on_duplicate=on_duplicate):
        if rec is not None:
            yield normalize_record(rec)


def _features():

    string, floats = datasets.Value("string"), datasets.Sequence(datasets.Value("float32"))
    strings = datasets.Sequence(string)
    return datasets.Features({"query": string, "pos": strings, "neg": strings, "neg_q": strings,
                              "pos_scores": floats, "neg_scores": floats})


def load_records(report: ValidationReport, *, require_neg_q: bool, group_size: int, max_line_bytes: int, cache_dir: Optional[str] = None):
    """The good records of a validated report as a memory-mapped ``datasets.Dataset`` (cached by
    the data's content hash)."""

    return datasets.Dataset.from_generator(
        _good_records,
        # A tuple: datasets would split a list into shards scanned apart, and duplicates across
        # files would no longer be seen as such.
        gen_kwargs={"files": tuple(report.files), "require_neg_q": require_neg_q, "group_size": group_size, "max_line_bytes": max_line_bytes,
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
