"""One CLP record's rules: fields, types, scores, and the overlaps that would make its loss meaningless."""

from __future__ import annotations

import math
from typing import Any, Optional

from clp_ray.util.unicode_text import SURROGATE, is_valid_text


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


def check_record(rec: Any, *, require_neg_q: bool, group_size: int) -> Optional[tuple[str, str]]:
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
    if "neg_q" not in rec and require_neg_q:
        return "neg_q", "missing while loss.lam > 0 (set lam to 0 for plain contrastive data)"
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
