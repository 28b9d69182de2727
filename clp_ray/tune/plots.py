"""Sweep plots for the parent MLflow run: optimization history, parameter importances, and the
dev metric of every trial over its eval periods. Optuna's own matplotlib plots are used on a study
rebuilt from the Tune results (public ``optuna.trial.create_trial``), so the plots work for
restored sweeps too."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from clp_ray.tune.space import distributions  # noqa: E402

log = logging.getLogger(__name__)


def sweep_study(trials, cfg, num_layers: int):
    """An Optuna study holding one finished trial per Tune trial that reported a dev metric, with the
    search table's distributions (:mod:`clp_ray.tune.space`)."""
    dists = distributions(cfg, num_layers)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in trials:
        if t.dev_metric is None:
            continue
        params = {k: v for k, v in t.params.items() if k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=float(t.dev_metric)))
    return study


def write_sweep_plots(trials, cfg, num_layers: int, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    study = sweep_study(trials, cfg, num_layers)
    if len(study.trials) >= 1:
        ax = ovm.plot_optimization_history(study)
        ax.set_ylabel("dev nDCG@10")
        written.append(_save(ax.figure, out / "optimization_history.png"))
    if len(study.trials) >= 2:
        try:
            ax = ovm.plot_param_importances(study)
            written.append(_save(ax.figure, out / "param_importances.png"))
        except (RuntimeError, ValueError) as e:  # e.g. every trial has the same value
            log.warning("parameter importances not plotted: %s", e)
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        if t.history:
            xs, ys = zip(*t.history)
            ax.plot(xs, ys, marker="o", label=f"{t.trial_id} ({t.status})")
    ax.set_xlabel("eval period")
    ax.set_ylabel("dev nDCG@10")
    ax.set_title("dev nDCG@10 per trial")
    if trials:
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "dev_metric_per_trial.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
