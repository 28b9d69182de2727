"""One Tune trial: the sampled values written into the config, its own ``TorchTrainer`` (the
training job's loop) reporting to Tune, and an MLflow child run of the sweep's parent run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import ray.tune
from ray.train import TrainingFailedError
from ray.tune.integration.ray_train import TuneReportCallback

from clp_ray.config import ExperimentConfig
from clp_ray.evaluation.dev_set import DevSet
from clp_ray.tracking.runs import Tracker, start_run_retrying
from clp_ray.train.payload import DataRef
from clp_ray.train.preflight import PreparedRun
from clp_ray.train.run import TrainResult, explain_failure, fit
from clp_ray.tune.space import apply_params, trial_params


@dataclass(frozen=True)
class SweepPayload:
    """What every trial of a sweep shares (sent once, with ``tune.with_parameters``)."""

    name: str
    base: ExperimentConfig  # the sweep's config, its MLflow store resolved to the driver's
    train_storage: str  # where the trials' Ray Train runs live
    ds_config: dict
    data: DataRef
    parent_run_id: Optional[str] = None
    dev: Optional[DevSet] = None  # the dev set every trial is selected on (built once by the driver)
    dev_init: Optional[dict[str, float]] = None  # the untrained model's dev metrics (the same for every trial)
    prefix_cache: Optional[str] = None  # the frozen-prefix cache every trial shares (None: off)


def fit_in_trial(prep: PreparedRun, tracker: Optional[Tracker], callbacks: Optional[list] = None) -> TrainResult:
    """:func:`~clp_ray.train.run.fit` inside a Tune trial: a failed training marks its MLflow run
    errored and ends it, then fails the trial with the workers' first error lines."""
    try:
        return fit(prep, tracker=tracker, callbacks=callbacks)
    except TrainingFailedError as e:
        if tracker:
            tracker.set_tags({"clp_ray.status": "errored", "clp_ray.error": explain_failure(e)})
            tracker.end("FAILED")
        raise RuntimeError(explain_failure(e)) from None


def run_trial(config: dict, sweep: SweepPayload) -> None:
    """The trainable Tune calls with the sampled ``config``; raises when the training fails."""
    params = trial_params(config)
    cfg = apply_params(sweep.base, params)
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{sweep.name}-{trial_id}"
    prep = PreparedRun(cfg, name, sweep.train_storage, sweep.ds_config, sweep.data, dev=sweep.dev, dev_init=sweep.dev_init,
                       prefix_cache=sweep.prefix_cache)
    tracker = None
    if sweep.parent_run_id:
        tracker = start_run_retrying(cfg, name, parent_run_id=sweep.parent_run_id,
                                     tags={"clp_ray.trial_id": trial_id, "clp_ray.kind": "trial", "clp_ray.status": "running"})
        tracker.log_params({**params, "moe.layers": cfg.moe.layers, **(sweep.dev.info.as_params() if sweep.dev else {})})
    result = fit_in_trial(prep, tracker, callbacks=[TuneReportCallback()])
    if tracker:  # its dev metrics were logged by the training run's rank 0
        tracker.set_tags({"clp_ray.status": "completed", "clp_ray.model_path": result.model_path or ""})
        tracker.end("FINISHED")
