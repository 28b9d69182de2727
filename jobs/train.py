"""Train one model (fixed hyper-parameters) with Ray Train + DeepSpeed ZeRO on the CLP loss.

    python jobs/train.py --lang hi [--profile local|cluster] [--set key=value ...] [--summary FILE]

Re-running the same command resumes the run (same train.run_name, or the config hash when unset).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_ray.cli import config_from_args, experiment_parser, run_job  # noqa: E402

log = logging.getLogger("clp_ray.train")


def main(args) -> dict:
    # The library (torch, Ray, MLflow) is imported here, not at the top: --help and bad arguments answer at once.
    from clp_ray.train import run_training
    from clp_ray.util.redact import redact

    cfg = config_from_args(args)
    result = run_training(cfg)
    m = result.metrics
    dev = {k: v for k, v in m.items() if k.startswith("dev_") and not k.endswith("_init")}
    init = {k.removesuffix("_init"): v for k, v in m.items() if k.startswith("dev_") and k.endswith("_init")}
    print(f"\nrun {result.name}: {int(m.get('step', 0))} optimizer steps; dev metrics in {cfg.eval.mode} mode"
          + (f" on {result.dev_set.describe()}" if result.dev_set else ""))
    for k, v in dev.items():
        before = init.get(k)
        print(f"  {k:<16} {v:.4f}" + (f"   (untrained {before:.4f})" if before is not None else ""))
    print(f"model: {redact(str(result.model_path))}")
    if result.local_model_path and result.local_model_path != result.model_path:
        print(f"local copy: {result.local_model_path}")
    print(f"MLflow run: {result.mlflow_run_id}")
    return {"run_name": result.name, "run_dir": result.run_dir, "checkpoint": result.checkpoint_path,
            "model_path": result.model_path, "local_model_path": result.local_model_path, "metrics": m,
            "mlflow_run_id": result.mlflow_run_id, "data_files": result.data_files, "eval_mode": cfg.eval.mode,
            "dev_set": result.dev_set.to_dict() if result.dev_set else None}


def parser():
    return experiment_parser(__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(run_job(main, parser().parse_args()))
