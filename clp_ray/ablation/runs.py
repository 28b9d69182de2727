"""Training the ablation's runs: Ray Tune over a grid of the runs still to train (no search, no
early stopping), each trial one ``TorchTrainer`` run of the training job's loop (DeepSpeed, fault
tolerance and checkpoints as in ``jobs/train.py``) and an MLflow child of the ablation's run.
As many run at once as the cluster holds (``ablation.max_concurrent_runs`` caps it)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray
import ray.tune
from mlflow import MlflowClient
from ray.tune import Callback

from clp_ray.ablation.arms import RunSpec
from clp_ray.ablation.results import TrainedRun
from clp_ray.config import ExperimentConfig
from clp_ray.errors import ClpRayError, JobInterrupted
from clp_ray.evaluation.dev_set import DevSet
from clp_ray.tracking.runs import Tracker, start_run_retrying, tracking_uri, with_driver_tracking
from clp_ray.train.deepspeed_config import deepspeed_config
from clp_ray.train.payload import DataRef
from clp_ray.train.preflight import PreparedRun, prefix_cache_dir
from clp_ray.tune.sweep import TRIAL_DRIVER_CPU, trials_that_fit
from clp_ray.tune.trial import fit_in_trial
from clp_ray.util.storage import join

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArmRunPayload:
    name: str
    arm: str
    seed: int
    cfg: ExperimentConfig  # its MLflow store resolved to the driver's
    ds_config: dict
    prefix_cache: Optional[str] = None  # the frozen-prefix cache (shared by the arms and seeds with one prefix)


@dataclass(frozen=True)
class AblationPayload:
    """What the trials share (sent once, with ``tune.with_parameters``); a trial's ``config`` names its run."""

    runs: dict[str, ArmRunPayload]
    train_storage: str
    data: DataRef
    parent_run_id: Optional[str]
    dev: Optional[DevSet] = None  # the dev set the runs report on (built once by the driver)


def _child_run(p: ArmRunPayload, parent_run_id: str) -> Tracker:
    """The run's MLflow child of the ablation's run: the open one a previous, interrupted attempt of
    this run left, else a new one."""
    uri = tracking_uri(p.cfg)
    client = MlflowClient(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([exp], filter_string=f"tags.`clp_ray.ablation_run` = '{p.name}' and "
                                                    f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    open_ = [r for r in found if r.info.status != "FINISHED"]
    if open_:
        client.update_run(open_[0].info.run_id, status="RUNNING")
        return Tracker(uri, open_[0].info.run_id)
    tracker = start_run_retrying(p.cfg, p.name, parent_run_id=parent_run_id, tags={
        "clp_ray.kind": "ablation_run", "clp_ray.ablation_run": p.name, "clp_ray.arm": p.arm, "clp_ray.seed": p.seed})
    tracker.log_params({**p.cfg.flat(), "ablation.arm": p.arm, "ablation.seed": p.seed})
    return tracker


def run_arm_trial(config: dict, ablation: AblationPayload) -> None:
    """The trainable: trains ``config["run"]`` and reports where its model is."""
    p = ablation.runs[config["run"]]
    prep = PreparedRun(p.cfg, p.name, ablation.train_storage, p.ds_config, ablation.data, dev=ablation.dev,
                       prefix_cache=p.prefix_cache)
    tracker = _child_run(p, ablation.parent_run_id) if ablation.parent_run_id else None
    result = fit_in_trial(prep, tracker)
    if tracker:
        tracker.set_tags({"clp_ray.status": "trained", "clp_ray.model_path": result.model_path or ""})
    ray.tune.report({"model_path": result.model_path or "", "mlflow_run_id": tracker.run_id if tracker else ""})


class _Progress(Callback):
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"[ablation] trained {self.done}/{self.total}: {trial.config.get('run')}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"[ablation] FAILED {self.done}/{self.total}: {trial.config.get('run')}", flush=True)


def _payload(specs: list[RunSpec], cfg: ExperimentConfig, data: DataRef, storage: str,
             parent: Optional[Tracker], dev: Optional[DevSet]) -> AblationPayload:
    runs = {}
    for s in specs:
        c = with_driver_tracking(s.cfg)
        runs[s.name] = ArmRunPayload(s.name, s.arm, s.seed or 0, c, deepspeed_config(c, c.ray.num_workers),
                                      prefix_cache_dir(c))
    return AblationPayload(runs, storage, data, parent.run_id if parent else None, dev)


def train_runs(specs: list[RunSpec], cfg: ExperimentConfig, *, data: DataRef, storage: str, name: str,
               parent: Optional[Tracker], folder_of, dev: Optional[DevSet] = None) -> list[TrainedRun]:
    """Train ``specs`` (Tune grid); each finished one is saved at once as a :class:`TrainedRun` in
    ``folder_of(name)``, so an interrupted or partly failed ablation keeps what it trained."""
    n = min(len(specs), cfg.ablation.max_concurrent_runs or trials_that_fit(cfg))
    log.info("ablation %s: training %d runs, %d at a time", name, len(specs), n)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_arm_trial, ablation=_payload(specs, cfg, data, storage, parent, dev)),
                                        {"CPU": TRIAL_DRIVER_CPU})
    tuner = ray.tune.Tuner(
        trainable, param_space={"run": ray.tune.grid_search([s.name for s in specs])},
        tune_config=ray.tune.TuneConfig(num_samples=1, max_concurrent_trials=n),
        run_config=ray.tune.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=join(storage, f"{name}-tune"),
                                      callbacks=[_Progress(len(specs))], verbose=0))
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    results = tuner.fit()
    trained, failed, missing = [], [], []
    for r in results:
        run = (r.config or {}).get("run", "?")
        m = r.metrics or {}
        if r.error:
            failed.append(f"{run}: {str(r.error).strip().splitlines()[-1] if str(r.error).strip() else type(r.error).__name__}")
        elif m.get("model_path"):
            t = TrainedRun(run, m["model_path"], m.get("mlflow_run_id") or None)
            t.save(Path(folder_of(run)))
            trained.append(t)
        else:
            missing.append(run)
    if failed:
        raise ClpRayError(f"{len(failed)} of {len(specs)} ablation runs failed (re-running the command retries only "
                          "those): " + "; ".join(failed))
    if missing:
        raise JobInterrupted(f"ablation {name} stopped with {len(missing)} of {len(specs)} runs unfinished; "
                             "re-run the same command to train only those")
    return trained
