"""The paper's ablation as one job: arms (base / CL / CLP / CLP + MoE by default) x seeds, trained
on the same data and budget, evaluated on the test split, compared with paired tests (Holm)."""

from clp_ray.ablation.job import ablation_name, run_ablation_job
from clp_ray.ablation.results import AblationOutcome, ArmResult, RunResult

__all__ = ["AblationOutcome", "ArmResult", "RunResult", "ablation_name", "run_ablation_job"]
