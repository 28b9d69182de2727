"""Hyper-parameter search for one language: Ray Tune + Optuna (TPE) + ASHA over Ray Train trials.

- :mod:`~clp_ray.tune.space` — the one table of searched parameters, the Optuna space, the paper's
  first point and the trial's config;
- :mod:`~clp_ray.tune.trial` — one trial (its own ``TorchTrainer``, an MLflow child run);
- :mod:`~clp_ray.tune.sweep` — the sweep (ASHA, resume, progress, capacity);
- :mod:`~clp_ray.tune.job` — the tune job: base model, sweep, test split, registry.
"""

from clp_ray.tune.job import TuneOutcome, base_model_test, run_tune_job
from clp_ray.tune.space import (
    SEARCH_PARAMS,
    SearchParam,
    SearchSpace,
    apply_params,
    check_space,
    points_to_evaluate,
    searches_moe,
    trial_params,
)
from clp_ray.tune.sweep import (
    METRIC,
    TRIAL_DRIVER_CPU,
    EndStoppedRunsCallback,
    ProgressCallback,
    TrialSummary,
    check_concurrency,
    max_concurrent,
    run_sweep,
    summarize,
    sweep_name,
    unfinished_trials,
)
from clp_ray.tune.trial import SweepPayload, run_trial

__all__ = [
    "METRIC", "SEARCH_PARAMS", "TRIAL_DRIVER_CPU", "EndStoppedRunsCallback", "ProgressCallback", "SearchParam",
    "SearchSpace", "SweepPayload", "TrialSummary", "TuneOutcome", "apply_params", "base_model_test", "check_concurrency",
    "check_space", "max_concurrent", "points_to_evaluate", "run_sweep", "run_trial", "run_tune_job", "searches_moe",
    "summarize", "sweep_name", "trial_params", "unfinished_trials",
]
