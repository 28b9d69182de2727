"""Hyper-parameter search for one language: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials,
tracked in MLflow; the best model is registered and becomes @champion only if it beats the current one.

    python jobs/tune.py --lang hi [--profile local|cluster] [--set key=value ...] [--fresh] [--summary FILE]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/tune.py --lang hi --profile cluster

Re-running the same command resumes an interrupted sweep; --fresh moves it aside and starts anew.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_ray.cli import config_from_args, experiment_parser, run_job  # noqa: E402

log = logging.getLogger("clp_ray.tune")


def main(args) -> dict:
    # The library (torch, Ray, MLflow) is imported here, not at the top: --help and bad arguments answer at once.
    from clp_ray.tracking.runs import tracking_uri
    from clp_ray.tune import run_tune_job
    from clp_ray.util.redact import redact

    cfg = config_from_args(args)
    out = run_tune_job(cfg, fresh=args.fresh)
    counts = {s: sum(1 for t in out.trials if t.status == s) for s in ("completed", "pruned", "errored")}
    print(f"\nsweep {out.sweep}: {len(out.trials)} trials ({counts['completed']} completed, {counts['pruned']} pruned by ASHA, "
          f"{counts['errored']} errored)")
    print(f"best trial {out.best.trial_id}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in out.best.params.items()))
    dev = out.dev_set
    print(f"  dev nDCG@10 {out.best.dev_metric:.4f} (base model {out.base_dev_metrics.get('ndcg@10', float('nan')):.4f})"
          + (f" on {dev.describe()}" if dev else ""))
    print(f"  {'test':<12}" + "  ".join(f"{k:>10}" for k in out.test_metrics))
    print(f"  {'base model':<12}" + "  ".join(f"{out.base_test_metrics[k]:>10.4f}" for k in out.test_metrics))
    print(f"  {'best trial':<12}" + "  ".join(f"{v:>10.4f}" for v in out.test_metrics.values()))
    print(f"  nDCG@10 {out.test_metrics['ndcg@10'] - out.base_test_metrics['ndcg@10']:+.4f} over the base model "
          f"(paired t-test p = {out.p_value_vs_base:.3g})")
    print(f"registered {out.registered_name} version {out.version}: {out.promotion.reason}")
    uri = tracking_uri(cfg)
    print("load it with:\n  " + (f"MLFLOW_TRACKING_URI={redact(uri)} " if not cfg.tracking.tracking_uri else "")
          + f"python -c \"import mlflow; print(mlflow.pyfunc.load_model('models:/{out.registered_name}@champion')"
          ".predict(['text']).shape)\"")
    return {
        "sweep": out.sweep, "parent_run_id": out.parent_run_id, "tracking_uri": uri,
        "trials": [{"trial_id": t.trial_id, "status": t.status, "iterations": t.iterations, "dev_ndcg@10": t.dev_metric,
                    "params": t.params} for t in out.trials],
        "best": {"trial_id": out.best.trial_id, "params": out.best.params, "dev_ndcg@10": out.best.dev_metric,
                 "model_path": out.best.model_path, "moe_layers": out.best_config.moe.layers},
        "dev_set": dev.to_dict() if dev else None, "base_dev_metrics": out.base_dev_metrics,
        "test_metrics": out.test_metrics,
        "base_test_metrics": out.base_test_metrics, "p_value_vs_base": out.p_value_vs_base, "data_files": out.data_files,
        "registered_model": out.registered_name, "version": out.version,
        "promoted": out.promotion.promoted, "promotion_reason": out.promotion.reason,
        "model_uri": f"models:/{out.registered_name}@champion",
    }


def parser():
    ap = experiment_parser(__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="start a new sweep instead of resuming (the old one is moved aside)")
    return ap


if __name__ == "__main__":
    sys.exit(run_job(main, parser().parse_args()))
