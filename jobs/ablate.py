"""The CLP paper's ablation for one language: base model, CL (λ = 0), CLP and CLP + MoE — or the
arms of the config's ``ablation`` section — trained over seeds on the same data and budget, with a
table of test metrics and paired significance tests (Holm-corrected).

    python jobs/ablate.py --lang hi [--profile local|cluster] [--seeds N] [--set key=value ...] [--summary FILE]

Re-running the same command trains and evaluates only the runs that are not finished yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_ray.cli import config_from_args, experiment_parser, int_at_least, run_job  # noqa: E402


def main(args) -> dict:
    # The library (torch, Ray, MLflow) is imported here, not at the top: --help and bad arguments answer at once.
    from clp_ray.ablation import run_ablation_job

    if args.seeds is not None:
        args.overrides = [*args.overrides, f"ablation.seeds={args.seeds}"]
    out = run_ablation_job(config_from_args(args))
    print(f"\nablation {out.name}: {len(out.arms)} arms, {sum(len(a.runs) for a in out.arms if a.train)} training runs "
          f"({out.trained_now} trained now)\n")
    print(Path(out.table_path).read_text(encoding="utf-8"))
    print(f"table: {out.table_path}\n       {out.csv_path}\n       {out.plot_path}\nMLflow parent run: {out.mlflow_parent_run_id}")
    return out.summary()


def parser():
    ap = experiment_parser(__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int_at_least(1), default=None, help="seeds per trained arm (default: ablation.seeds)")
    return ap


if __name__ == "__main__":
    sys.exit(run_job(main, parser().parse_args()))
