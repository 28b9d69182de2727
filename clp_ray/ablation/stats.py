"""The ablation's numbers: mean and spread over seeds, paired tests on per-query scores, Holm.

The paired test is :func:`clp_ray.evaluation.paired_p_value`, scipy's two-sided paired t-test
(``scipy.stats.ttest_rel``), on the per-query
scores of the two arms, each arm's scores first averaged over its seeds: the same test the tune job
reports against the base model, on the unit the metrics are means of (queries), without ranx's
extra dependencies (numba). Holm's step-down correction comes from statsmodels
(``multipletests(method="holm")``), applied per metric across all the comparisons of the table.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from statsmodels.stats.multitest import multipletests

from clp_ray.errors import DataError
from clp_ray.evaluation import paired_p_value


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float  # sample standard deviation over seeds (ddof 1); 0 for a single run


@dataclass(frozen=True)
class Comparison:
    arm: str
    against: str
    metric: str
    diff: float  # arm's mean minus against's mean
    p_value: float
    p_holm: float


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_average(per_query_runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per query, the mean of its scores over the runs (seeds); every run must score the same queries."""
    qids = set(per_query_runs[0])
    if any(set(r) != qids for r in per_query_runs):
        raise DataError("the runs of one arm were not evaluated on the same queries")
    return {q: statistics.fmean(r[q] for r in per_query_runs) for q in sorted(qids)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the given order."""
    if not p_values:
        return []
    return [float(p) for p in multipletests(list(p_values), method="holm")[1]]


def compare_arms(per_query: dict[str, dict[str, dict[str, float]]], pairs: Sequence[tuple[str, str]],
                 metrics: Sequence[str]) -> list[Comparison]:
    """``per_query[arm][metric]``: the arm's seed-averaged per-query scores. One comparison per
    (arm, against) pair and metric, Holm-corrected per metric across the pairs."""
    out: list[Comparison] = []
    for metric in metrics:
        raw = [paired_p_value(per_query[a][metric], per_query[b][metric]) for a, b in pairs]
        for (a, b), p, ph in zip(pairs, raw, holm(raw)):
            diff = statistics.fmean(per_query[a][metric].values()) - statistics.fmean(per_query[b][metric].values())
            out.append(Comparison(a, b, metric, diff, p, ph))
    return out


def comparison_pairs(arms: Sequence[str], baseline: str, base: str | None) -> list[tuple[str, str]]:
    """Every trained arm against the baseline arm, and every arm against the base model (the
    untrained arm): each pair once, in the direction "arm minus the one it is compared against"."""
    pairs = [(a, baseline) for a in arms if a not in (baseline, base)]
    if base is not None:
        pairs += [(a, base) for a in arms if a != base and (a, base) not in pairs]
    return pairs
