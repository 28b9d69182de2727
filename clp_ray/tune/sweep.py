"""The sweep: Ray Tune + Optuna (TPE) + ASHA over :func:`~clp_ray.tune.trial.run_trial`.

The sweep's name is stable (``tune-<lang>-<hash of config and data>``), so re-running the same
command restores an interrupted sweep with ``Tuner.restore``; ``--fresh`` moves the old one aside.
Every eval-period report of a trial's training run is a Tune result, so ASHA stops weak trials
early on ``dev_ndcg@10``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import ray
import ray.tune
from mlflow import MlflowClient
from ray.tune import Callback, ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from clp_ray.config import ExperimentConfig
from clp_ray.errors import ConfigError, JobInterrupted
from clp_ray.tracking.runs import Tracker, with_driver_tracking
from clp_ray.train.preflight import PreparedRun, run_hash, storage_path
from clp_ray.train.run import checkpoint_model
from clp_ray.train.schedule import plan_steps
from clp_ray.tune.space import SearchSpace, points_to_evaluate, trial_params
from clp_ray.tune.trial import SweepPayload, run_trial
from clp_ray.util.storage import join, location, move_aside

log = logging.getLogger(__name__)

METRIC = "dev_ndcg@10"
# A trial's driver function (it only builds and fits a TorchTrainer) asks for this much CPU.
TRIAL_DRIVER_CPU = 0.01


def sweep_name(cfg: ExperimentConfig, data_hash: str) -> str:
    """``tune-<lang>-<hash of the config and the data>``: the same command on the same data resumes."""
    return f"tune-{cfg.lang}-{run_hash(cfg, data_hash)}"


def _per_trial(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while it runs: its workers plus its driver function's CPU."""
    r = cfg.ray
    need = {"CPU": r.num_workers * r.cpus_per_worker + TRIAL_DRIVER_CPU}
    if r.use_gpu:
        need["GPU"] = r.num_workers * max(r.gpus_per_worker, 1)
    return need


def max_concurrent(cfg: ExperimentConfig) -> int:
    """From config, else how many trials the cluster's resources hold at once."""
    return cfg.search.max_concurrent_trials or trials_that_fit(cfg)


def trials_that_fit(cfg: ExperimentConfig) -> int:
    """How many trials (each ``ray.num_workers`` workers and a driver) the cluster holds at once."""
    have = ray.cluster_resources()
    return max(1, min(int(have.get(k, 0) // v) for k, v in _per_trial(cfg).items()))


def check_concurrency(cfg: ExperimentConfig) -> None:
    """``search.max_concurrent_trials`` trials must fit the cluster at once: a trial that does not
    fit waits for its placement group, times out (Ray Train's worker-group start timeout, 60 s) and
    retries, so trials silently run one after another at extra cost."""
    n = cfg.search.max_concurrent_trials
    if cfg.ray.autoscaling or not n:
        return
    have = ray.cluster_resources()
    short = [f"{n * v:g} {k} (cluster has {have.get(k, 0):g})" for k, v in _per_trial(cfg).items()
             if n * v > have.get(k, 0) + 1e-9]
    if short:
        raise ConfigError(f"{cfg.cite('search.max_concurrent_trials')}: {n} trials at once need {', '.join(short)} "
                          f"(per trial {cfg.ray.num_workers} workers x {cfg.ray.cpus_per_worker:g} CPU + "
                          f"{TRIAL_DRIVER_CPU} CPU for its driver); lower it or give Ray more (ray.num_cpus locally)")


@dataclass
class TrialSummary:
    trial_id: str
    params: dict
    status: str  # completed | pruned | errored
    iterations: int
    dev_metric: Optional[float]
    model_path: Optional[str]
    history: list[tuple[int, float]] = field(default_factory=list)


class ProgressCallback(Callback):
    """Prints a line a person can follow whenever a trial finishes or is stopped."""

    def __init__(self, total: int):
        self.total = total
        self.done = self.pruned = self.errored = 0
        self.best: Optional[tuple[float, str]] = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(METRIC)
        if isinstance(v, (int, float)) and (self.best is None or v > self.best[0]):
            self.best = (float(v), trial.trial_id)

    def _line(self) -> None:
        best = f"best {METRIC} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else "no result yet"
        print(f"[sweep] {self.done + self.pruned + self.errored}/{self.total} trials finished: {self.done} completed, "
              f"{self.pruned} pruned by ASHA, {self.errored} errored; {best}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get("final"):
            self.done += 1
        else:
            self.pruned += 1
        self._line()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errored += 1
        self._line()


class EndStoppedRunsCallback(Callback):
    """Driver-side: a trial that Tune stopped (ASHA) never ends its own MLflow run; end it here with
    its status (pruned, or completed when the stop came right after its final report)."""

    def __init__(self, uri: str, parent_run_id: str):
        self.uri = uri
        self.parent_run_id = parent_run_id

    def _finish(self, trial, status: str, run_status: str) -> None:
        client = MlflowClient(self.uri)
        runs = client.search_runs(
            [client.get_run(self.parent_run_id).info.experiment_id],
            filter_string=f"tags.`clp_ray.trial_id` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'")
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "clp_ray.status", status)
                client.set_terminated(run.info.run_id, run_status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get("final"):
            self._finish(trial, "completed", "FINISHED")
        else:
            self._finish(trial, "pruned", "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "errored", "FAILED")


def summarize(results, storage: str) -> list[TrialSummary]:
    """Trial summaries; model paths are locations on the run storage ``storage`` (URIs when remote)."""
    out = []
    for r in results:
        m = r.metrics or {}
        status = "errored" if r.error else ("completed" if m.get("final") else "pruned")
        ckpt = m.get("checkpoint_path")  # a path inside the storage's filesystem (no scheme)
        model_path = checkpoint_model(location(storage, ckpt)) if ckpt and m.get("final") else None
        hist: list[tuple[int, float]] = []
        df = r.metrics_dataframe
        if df is not None and METRIC in df:
            hist = [(int(i), float(v)) for i, v in zip(df["training_iteration"], df[METRIC]) if v == v]
        out.append(TrialSummary(str(m.get("trial_id") or (r.path or "").rsplit("/", 1)[-1]), trial_params(r.config or {}),
                                status, int(m.get("training_iteration", 0) or 0), m.get(METRIC), model_path, hist))
    return out


def _restore(exp_dir: str, trainable, callbacks: list):
    """``Tuner.restore`` with the sweep's callbacks attached again. Tune saves no callbacks with the
    sweep and ``restore`` takes none; this is the one place that reaches into the restored tuner's
    run config to put them back (without them a resumed sweep prints no progress and leaves the MLflow
    runs of stopped trials open)."""
    tuner = ray.tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, restart_errored=True)
    run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
    if run_config is not None:
        run_config.callbacks = callbacks
    else:  # a Ray without that attribute: resume anyway, without them
        log.warning("resumed sweep %s without its progress/MLflow callbacks (this Ray version hides them)", exp_dir)
    return tuner


def _new_tuner(cfg: ExperimentConfig, trainable, run_config, num_layers: int, reports: int):
    searcher = OptunaSearch(SearchSpace(cfg, num_layers), metric=METRIC, mode="max",
                            points_to_evaluate=points_to_evaluate(cfg, num_layers), seed=cfg.search.seed)
    # max_t one past the last report: the scheduler never stops a trial at its final report, so the
    # trial finishes its own bookkeeping.
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode="max", max_t=reports + 1,
                              grace_period=min(cfg.search.asha_grace_period, max(reports, 1)),
                              reduction_factor=cfg.search.asha_reduction_factor)
    return ray.tune.Tuner(trainable, run_config=run_config, tune_config=ray.tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler, num_samples=cfg.search.num_samples,
        max_concurrent_trials=max_concurrent(cfg)))


def _payload(cfg: ExperimentConfig, prep: PreparedRun, storage: str, parent: Optional[Tracker]) -> SweepPayload:
    return SweepPayload(prep.name, with_driver_tracking(cfg), join(storage, f"{prep.name}-trials"), prep.ds_config, prep.data,
                        parent.run_id if parent else None, prep.dev, prep.dev_init, prep.prefix_cache)


def run_sweep(cfg: ExperimentConfig, *, prep: PreparedRun, num_layers: int, fresh: bool = False,
              parent_tracker: Optional[Tracker] = None) -> list[TrialSummary]:
    """Run (or resume) the sweep ``prep.name``; returns the trial summaries."""
    name, storage = prep.name, storage_path(cfg)
    exp_dir = join(storage, name)  # a string: storage may be a URI, which Path would mangle
    if fresh:
        aside = move_aside(exp_dir, f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        if aside:
            log.info("--fresh: moved the previous sweep to %s", aside)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, sweep=_payload(cfg, prep, storage, parent_tracker)),
                                        {"CPU": TRIAL_DRIVER_CPU})
    callbacks: list = [ProgressCallback(cfg.search.num_samples)]
    if parent_tracker:
        callbacks.append(EndStoppedRunsCallback(parent_tracker.uri, parent_tracker.run_id))
    if not fresh and ray.tune.Tuner.can_restore(exp_dir):
        log.info("resuming sweep %s from %s", name, exp_dir)
        tuner = _restore(exp_dir, trainable, callbacks)
    else:
        reports = plan_steps(prep.train_records, cfg.ray.num_workers, cfg.train).reports
        run_config = ray.tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=1)
        tuner = _new_tuner(cfg, trainable, run_config, num_layers, reports)
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    results = tuner.fit()
    # On Ctrl+C Tune saves its state and returns normally, with the trials it stopped marked
    # TERMINATED like finished ones (as pruned ones are): only the saved state tells them apart.
    unfinished = unfinished_trials(exp_dir)
    finished = results.num_terminated + results.num_errors - len(unfinished)
    if unfinished or finished < cfg.search.num_samples:
        raise JobInterrupted(f"sweep {name} stopped with {finished} of {cfg.search.num_samples} trials finished "
                             f"(state saved in {exp_dir}); re-run the same command to resume it")
    return summarize(results, storage)


def unfinished_trials(exp_dir: str) -> list[str]:
    """Ids of the trials that the sweep's saved state holds as not yet finished (neither
    TERMINATED nor ERROR): after ``Tuner.fit()`` returns, these were stopped by an interrupt."""
    return [t.trial_id for t in ExperimentAnalysis(exp_dir).trials if t.status not in ("TERMINATED", "ERROR")]
