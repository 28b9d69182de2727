"""The ablation's table (Markdown for people, CSV for scripts) and its bar chart."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from clp_ray.ablation.results import ArmResult  # noqa: E402
from clp_ray.ablation.stats import Comparison  # noqa: E402
from clp_ray.util.atomic import atomic_path, write_text  # noqa: E402

NAMES = {"ndcg@10": "nDCG@10", "ndcg@5": "nDCG@5", "recall@100": "Recall@100", "mrr@10": "MRR@10"}


def _find(comparisons: list[Comparison], arm: str, against: Optional[str], metric: str) -> Optional[Comparison]:
    return next((c for c in comparisons if c.arm == arm and c.against == against and c.metric == metric), None)


def _delta(c: Optional[Comparison]) -> str:
    return f"{c.diff:+.4f} (p {c.p_holm:.2g})" if c else "-"


def markdown_table(arms: list[ArmResult], comparisons: list[Comparison], metrics: list[str], baseline: str,
                   base: Optional[str]) -> str:
    """Per arm: mean ± std over seeds of each metric; the first metric's Δ against the baseline arm
    and the base model with Holm-adjusted p-values."""
    primary = NAMES.get(metrics[0], metrics[0])
    head = ["arm", "seeds", *(NAMES.get(m, m) for m in metrics), f"Δ {primary} vs {baseline}"]
    if base:
        head.append(f"Δ {primary} vs {base}")
    rows = [head, ["---"] * len(head)]
    for a in arms:
        row = [a.name, str(len(a.runs) if a.train else 0)]
        row += [f"{s.mean:.4f} ± {s.std:.4f}" if a.train and len(a.runs) > 1 else f"{s.mean:.4f}"
                for s in (a.metric(m) for m in metrics)]
        row.append(_delta(_find(comparisons, a.name, baseline, metrics[0])))
        if base:
            row.append(_delta(_find(comparisons, a.name, base, metrics[0])))
        rows.append(row)
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    note = ("\nMeans ± sample std over seeds; Δ: the arm's mean minus the other's; p: two-sided paired t-test on "
            "per-query scores averaged over seeds (scipy), Holm-adjusted per metric across the table's comparisons "
            "(statsmodels). All comparisons are in ablation.csv.\n")
    return "\n".join(lines) + "\n" + note


def csv_table(arms: list[ArmResult], comparisons: list[Comparison], metrics: list[str], baseline: str,
              base: Optional[str]) -> str:
    """One row per arm x metric: mean, std, seed count, and Δ, p and Holm's p against the baseline
    arm and the base model."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arm", "metric", "mean", "std", "seeds", "against_baseline", "diff_vs_baseline", "p_vs_baseline",
                "p_holm_vs_baseline", "against_base", "diff_vs_base", "p_vs_base", "p_holm_vs_base"])
    for a in arms:
        for m in metrics:
            s = a.metric(m)
            row: list = [a.name, m, f"{s.mean:.6f}", f"{s.std:.6f}", len(a.runs) if a.train else 0]
            for other in (baseline, base):
                c = _find(comparisons, a.name, other, m)
                row += [other or "", *((f"{c.diff:.6f}", f"{c.p_value:.6g}", f"{c.p_holm:.6g}") if c else ("", "", ""))]
            w.writerow(row)
    return buf.getvalue()


def bar_chart(arms: list[ArmResult], metric: str, path: Path) -> Path:
    """Each arm's mean ``metric`` as a bar, its seeds' spread as an error bar and its runs as dots."""
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 4))
    xs = range(len(arms))
    stats_ = [a.metric(metric) for a in arms]
    ax.bar(xs, [s.mean for s in stats_], yerr=[s.std for s in stats_], capsize=6, color="#7aa6c2", edgecolor="#2b556e")
    for x, a in zip(xs, arms):
        ax.scatter([x] * len(a.runs), [r.metrics[metric] for r in a.runs], color="#1b2f3d", s=14, zorder=3)
    ax.set_xticks(list(xs), [a.name for a in arms])
    ax.set_ylabel(f"test {NAMES.get(metric, metric)}")
    lo = min(min(r.metrics[metric] for r in a.runs) for a in arms)
    ax.set_ylim(max(0.0, lo - 0.05), None)
    ax.set_title(f"ablation: test {NAMES.get(metric, metric)} per arm (mean, std over seeds, runs)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def write_report(arms: list[ArmResult], comparisons: list[Comparison], metrics: list[str], baseline: str,
                 base: Optional[str], out_dir: Path) -> tuple[Path, Path, Path]:
    """``ablation.md``, ``ablation.csv`` and ``ablation.png`` in ``out_dir``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = write_text(out_dir / "ablation.md", markdown_table(arms, comparisons, metrics, baseline, base))
    table = write_text(out_dir / "ablation.csv", csv_table(arms, comparisons, metrics, baseline, base))
    return md, table, bar_chart(arms, metrics[0], out_dir / "ablation.png")
