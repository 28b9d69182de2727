"""Hyper-parameter search: an Optuna define-by-run space, ASHA, one TorchTrainer per Tune trial.

Each Tune trial is a function that builds and fits its own Ray Train ``TorchTrainer`` (Train V2:
Tune no longer wraps trainers) with ``TuneReportCallback``, so every eval-period report of the
training run becomes a Tune result and ASHA can stop weak trials early on ``dev_ndcg@10``.
The sweep's name is stable (``tune-<lang>-<config hash>``), so re-running the same command
restores an interrupted sweep with ``Tuner.restore``; ``--fresh`` moves the old one aside.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from clp_ray.config import ExperimentConfig
from clp_ray.errors import ClpRayError, ConfigError, JobInterrupted

log = logging.getLogger(__name__)

METRIC = "dev_ndcg@10"
MOE_PARAMS = ("num_experts", "top_k", "moe_layer")
# A trial's driver function (it only builds and fits a TorchTrainer) asks for this much CPU.
TRIAL_DRIVER_CPU = 0.01
# The CLP paper's setting, always evaluated first.
PAPER_POINT = {"lam": 0.1, "temperature": 0.02, "num_experts": 2, "top_k": 1}


# --------------------------------------------------------------------------------------------
# Space.


def searches_moe(cfg: ExperimentConfig) -> bool:
    return cfg.moe.enabled and cfg.search.search_moe


def check_space(cfg: ExperimentConfig, num_layers: int) -> None:
    s = cfg.search
    if searches_moe(cfg):
        if max(s.top_k) > min(s.num_experts):
            raise ConfigError(f"{cfg.cite('search.top_k')} has a value above the smallest of "
                              f"{cfg.cite('search.num_experts')}: every (experts, top_k) pair must be valid")
        if s.layer_mode == "block" and s.block_size > num_layers:
            raise ConfigError(f"{cfg.cite('search.block_size')} exceeds the model's {num_layers} layers; "
                              f"{cfg.cite('model.name_or_path')}")
    if s.lam[1] > 0 and cfg.data.train_group_size < 2:
        raise ConfigError(f"{cfg.cite('search.lam')} allows lam > 0, which needs hard negatives, but "
                          f"{cfg.cite('data.train_group_size')}: it must be >= 2")


class SearchSpace:
    """The define-by-run space for OptunaSearch (a class, not a closure: Tune pickles the
    searcher). MoE parameters are only sampled when MoE is on."""

    def __init__(self, cfg: ExperimentConfig, num_layers: int):
        s = cfg.search
        self.lam, self.temperature, self.learning_rate = tuple(s.lam), tuple(s.temperature), tuple(s.learning_rate)
        self.moe = searches_moe(cfg)
        self.num_experts, self.top_k = list(s.num_experts), list(s.top_k)
        self.last_start = num_layers - (s.block_size if s.layer_mode == "block" else 1)

    def __call__(self, trial) -> None:
        trial.suggest_float("lam", *self.lam)
        trial.suggest_float("temperature", *self.temperature, log=True)
        trial.suggest_float("learning_rate", *self.learning_rate, log=True)
        if self.moe:
            trial.suggest_categorical("num_experts", self.num_experts)
            trial.suggest_categorical("top_k", self.top_k)
            trial.suggest_int("moe_layer", 0, self.last_start)


def points_to_evaluate(cfg: ExperimentConfig, num_layers: int) -> list[dict]:
    """The paper's setting (clipped into the configured bounds), learning rate from ``train``."""
    s = cfg.search
    clip = lambda v, lo_hi: min(max(v, lo_hi[0]), lo_hi[1])  # noqa: E731
    point: dict[str, Any] = {"lam": clip(PAPER_POINT["lam"], s.lam), "temperature": clip(PAPER_POINT["temperature"], s.temperature),
                             "learning_rate": clip(cfg.train.learning_rate, s.learning_rate)}
    if searches_moe(cfg):
        point["num_experts"] = PAPER_POINT["num_experts"] if PAPER_POINT["num_experts"] in s.num_experts else s.num_experts[0]
        point["top_k"] = PAPER_POINT["top_k"] if PAPER_POINT["top_k"] in s.top_k else s.top_k[0]
        point["moe_layer"] = num_layers - (s.block_size if s.layer_mode == "block" else 1)
    return [point]


def apply_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The trial's config: the base config with the sampled values written in."""
    data = cfg.to_dict()
    data["loss"]["lam"] = params["lam"]
    data["loss"]["temperature"] = params["temperature"]
    data["train"]["learning_rate"] = params["learning_rate"]
    if "num_experts" in params:
        data["moe"]["num_experts"] = params["num_experts"]
        data["moe"]["top_k"] = params["top_k"]
        start = params["moe_layer"]
        size = cfg.search.block_size if cfg.search.layer_mode == "block" else 1
        data["moe"]["layers"] = list(range(start, start + size))
    return ExperimentConfig.model_validate(data)


def trial_params(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# Trial.


def run_trial(config: dict, base: dict, sweep: dict) -> None:
    """One Tune trial: its own TorchTrainer, metrics forwarded to Tune, one MLflow child run."""
    import ray.tune
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    from clp_ray.tracking import start_run_retrying
    from clp_ray.training import PreparedRun, explain_failure, fit

    params = trial_params(config)
    cfg = apply_params(ExperimentConfig.model_validate(base), params)
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{sweep['name']}-{trial_id}"
    prep = PreparedRun(cfg, name, sweep["train_storage"], sweep["ds_config"], sweep["data_files"], sweep["data_hash"], {})
    tracker = None
    if sweep.get("parent_run_id"):
        tracker = start_run_retrying(cfg, name, parent_run_id=sweep["parent_run_id"],
                                     tags={"clp_ray.trial_id": trial_id, "clp_ray.kind": "trial", "clp_ray.status": "running"})
        tracker.log_params({**params, "moe.layers": cfg.moe.layers})
    try:
        result = fit(prep, tracker=tracker, callbacks=[TuneReportCallback()])
    except TrainingFailedError as e:
        if tracker:
            tracker.set_tags({"clp_ray.status": "errored", "clp_ray.error": explain_failure(e)})
            tracker.end("FAILED")
        raise RuntimeError(explain_failure(e)) from None
    if tracker:  # its dev metrics were logged by the training run's rank 0
        tracker.set_tags({"clp_ray.status": "completed", "clp_ray.model_path": result.model_path or ""})
        tracker.end("FINISHED")


# --------------------------------------------------------------------------------------------
# Driver.


def sweep_name(cfg: ExperimentConfig, data_hash: str) -> str:
    """``tune-<lang>-<hash of the config and the data>``: the same command on the same data resumes."""
    from clp_ray.training import run_hash

    return f"tune-{cfg.lang}-{run_hash(cfg, data_hash)}"


def _per_trial(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while it runs: its workers plus its driver function's CPU."""
    r = cfg.ray
    need = {"CPU": r.num_workers * r.cpus_per_worker + TRIAL_DRIVER_CPU}
    if r.use_gpu:
        need["GPU"] = r.num_workers * max(r.gpus_per_worker, 1)
    return need


def max_concurrent(cfg: ExperimentConfig) -> int:
    """From config, else how many trials the cluster's resources hold at once (GPUs per trial on a
    GPU cluster, CPUs locally)."""
    if cfg.search.max_concurrent_trials:
        return cfg.search.max_concurrent_trials
    import ray

    have = ray.cluster_resources()
    return max(1, min(int(have.get(k, 0) // v) for k, v in _per_trial(cfg).items()))


def check_concurrency(cfg: ExperimentConfig) -> None:
    """``search.max_concurrent_trials`` trials must fit the cluster at once: a trial that does not
    fit waits for its placement group, times out (Ray Train's worker-group start timeout, 60 s) and
    retries, so trials silently run one after another at extra cost."""
    import ray

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

    def _line(self, trials) -> None:
        best = f"best {METRIC} {self.best[0]:.4f} (trial {self.best[1]})" if self.best else "no result yet"
        print(f"[sweep] {self.done + self.pruned + self.errored}/{self.total} trials finished: {self.done} completed, "
              f"{self.pruned} pruned by ASHA, {self.errored} errored; {best}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get("final"):
            self.done += 1
        else:
            self.pruned += 1
        self._line(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errored += 1
        self._line(trials)


class EndStoppedRunsCallback(Callback):
    """Driver-side: a trial that Tune stopped (ASHA) never ends its own MLflow run; end it here with
    its status (pruned, or completed when the stop came right after its final report)."""

    def __init__(self, uri: str, parent_run_id: str):
        self.uri = uri
        self.parent_run_id = parent_run_id

    def _finish(self, trial, status: str, run_status: str) -> None:
        from mlflow import MlflowClient

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
    from clp_ray.storage import location
    from clp_ray.training import checkpoint_model

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
        params = trial_params(r.config or {})
        out.append(TrialSummary(str(m.get("trial_id") or (r.path or "").rsplit("/", 1)[-1]), params, status,
                                int(m.get("training_iteration", 0) or 0), m.get(METRIC), model_path, hist))
    return out


def run_sweep(cfg: ExperimentConfig, *, prep, num_layers: int, fresh: bool = False,
              parent_tracker=None) -> list[TrialSummary]:
    """Run (or resume) the sweep ``sweep_name(cfg)``; returns the trial summaries. ``prep`` and
    ``num_layers`` come from the checks the tune job ran before any cluster work."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from clp_ray.storage import join, move_aside
    from clp_ray.tracking import tracking_uri
    from clp_ray.training import storage_path

    name = prep.name
    storage = storage_path(cfg)
    # A string, not a Path: storage may be a URI (s3://...), which Path would turn into "s3:/...".
    exp_dir = join(storage, name)
    if fresh:
        aside = move_aside(exp_dir, f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        if aside:
            log.info("--fresh: moved the previous sweep to %s", aside)
    sweep = {
        "name": name, "train_storage": join(storage, f"{name}-trials"), "ds_config": prep.ds_config,
        "data_files": prep.data_files, "data_hash": prep.data_hash,
        "parent_run_id": parent_tracker.run_id if parent_tracker else None,
    }
    base = cfg.to_dict()
    # Trials run in working directories of their own, where the default MLflow URI (a SQLite file in
    # the working directory) would be another database: they get the driver's resolved one.
    base["tracking"]["tracking_uri"] = tracking_uri(cfg)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=base, sweep=sweep), {"CPU": TRIAL_DRIVER_CPU})
    total_evals = _evals_per_trial(cfg, prep)
    callbacks = [ProgressCallback(cfg.search.num_samples)]
    if parent_tracker:
        callbacks.append(EndStoppedRunsCallback(parent_tracker.uri, parent_tracker.run_id))
    run_config = ray.tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=1)
    if not fresh and ray.tune.Tuner.can_restore(exp_dir):
        log.info("resuming sweep %s from %s", name, exp_dir)
        tuner = ray.tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, restart_errored=True,
                                       param_space=None)
        # Callbacks are not part of the saved state: attach them again.
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        searcher = OptunaSearch(SearchSpace(cfg, num_layers), metric=METRIC, mode="max",
                                points_to_evaluate=points_to_evaluate(cfg, num_layers), seed=cfg.search.seed)
        # max_t one past the last report: the scheduler never stops a trial at its final report,
        # so the trial finishes its own bookkeeping.
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode="max", max_t=total_evals + 1,
                                  grace_period=min(cfg.search.asha_grace_period, max(total_evals, 1)),
                                  reduction_factor=cfg.search.asha_reduction_factor)
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.search.num_samples,
                                            max_concurrent_trials=max_concurrent(cfg)),
            run_config=run_config,
        )
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
    from ray.tune import ExperimentAnalysis

    return [t.trial_id for t in ExperimentAnalysis(exp_dir).trials if t.status not in ("TERMINATED", "ERROR")]


def _evals_per_trial(cfg: ExperimentConfig, prep) -> int:
    """How many reports a full trial makes (ASHA's max_t)."""
    from clp_ray.data import steps_per_epoch

    n_train = prep.extra.get("train_records") or 0
    t = cfg.train
    micro = steps_per_epoch(max(n_train, 1), cfg.ray.num_workers, t.per_device_batch_size)
    total_opt = t.max_steps or max(1, (t.epochs * micro) // t.gradient_accumulation_steps)
    every = t.eval_every_steps or max(1, micro // t.gradient_accumulation_steps)
    return math.ceil(total_opt / every)


# --------------------------------------------------------------------------------------------
# The whole job: sweep -> best trial -> held-out test -> registry.


@dataclass
class TuneOutcome:
    sweep: str
    trials: list[TrialSummary]
    best: TrialSummary
    best_config: ExperimentConfig
    test_metrics: dict[str, float]
    registered_name: str
    version: str
    promotion: Any
    parent_run_id: str
    base_test_metrics: dict[str, float] = field(default_factory=dict)
    p_value_vs_base: Optional[float] = None  # paired t-test on per-query test nDCG@10, best trial vs base
    data_files: list[str] = field(default_factory=list)  # the training files read (folders expanded)


def base_model_test(cfg: ExperimentConfig, test_set) -> Any:
    """The untrained model's test result (per-query scores kept for the paired test), cached on disk
    per (model, its settings, evaluation set, depth): a resumed or repeated sweep does not pay again."""
    import hashlib
    import json

    from clp_ray.evaluation import evaluate, load_result, save_result
    from clp_ray.modeling import load_embedder
    from clp_ray.training import model_settings

    key = json.dumps({"model": cfg.model.name_or_path, "tiny": cfg.model.tiny.model_dump(),
                      "settings": model_settings(cfg).settings.to_dict(), "eval_set": test_set.content_hash(),
                      "top_k": cfg.eval.top_k, "format": 1}, sort_keys=True)
    path = Path(cfg.train.output_dir).resolve() / "base_eval" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    cached = load_result(path)
    if cached is not None:
        log.info("base model's test metrics from %s", path)
        return cached
    log.info("evaluating the base model (no training) on %s", test_set.name)
    res = evaluate(load_embedder(cfg.model), test_set, batch_size=cfg.eval.batch_size, chunk_size=cfg.eval.chunk_size,
                   top_k=cfg.eval.top_k, show_progress=True)
    save_result(res, path)
    return res


def run_tune_job(cfg: ExperimentConfig, *, fresh: bool = False) -> TuneOutcome:
    from clp_ray.evaluation import load_beir
    from clp_ray.modeling import num_encoder_layers
    from clp_ray.training import check_moe_layers, check_resources, ensure_ray, prepare, resolve_model_path, run_lock

    cfg = resolve_model_path(cfg)
    # Everything that can fail on user input fails here, before any cluster work.
    layers = num_encoder_layers(cfg.model)
    check_space(cfg, layers)
    if not searches_moe(cfg):  # otherwise every trial gets its layers from the search space
        check_moe_layers(cfg, layers)
    prep = prepare(cfg, name=sweep_name)
    name = prep.name
    if not cfg.eval.data_dir:
        raise ConfigError("eval.data_dir is not set: the best trial is evaluated on its held-out test split")
    test_set = load_beir(cfg.eval.data_dir, cfg.eval.test_split, miracl_root=cfg.eval.miracl_root)
    with run_lock(cfg, name):  # before any cluster work: a second identical command stops here
        ensure_ray(cfg)
        check_resources(cfg)
        check_concurrency(cfg)
        return _sweep_and_register(cfg, prep, layers, test_set, fresh)


def _sweep_and_register(cfg: ExperimentConfig, prep, layers: int, test_set, fresh: bool) -> TuneOutcome:
    """The tune job after its checks: MLflow parent run, base model, sweep, test, registry."""
    from clp_ray.evaluation import compare, evaluate
    from clp_ray.modeling import Embedder
    from clp_ray.plots import write_sweep_plots
    from clp_ray.storage import local_folder
    from clp_ray.tracking import (
        git_commit,
        load_registered_embedder,
        log_embedder_model,
        metric_key,
        promote_if_better,
        registered_model_name,
        resume_or_start_run,
    )

    name = prep.name

    def on_start(tracker) -> None:
        tracker.log_params({**{f"search.{k}": v for k, v in cfg.search.model_dump().items()},
                            "model.name_or_path": cfg.model.name_or_path, "data.content_hash": prep.data_hash,
                            **prep.settings_params()})
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        tracker.log_text(json.dumps(prep.model_settings, indent=2), "model_settings.json")

    parent = resume_or_start_run(
        cfg, Path(cfg.train.output_dir).resolve() / name / "mlflow_parent_run_id", name, resume=not fresh,
        tags={"clp_ray.kind": "sweep", "clp_ray.data_hash": prep.data_hash, "clp_ray.git_commit": git_commit()},
        on_start=on_start)
    log.info("sweep %s: %d trials, MLflow parent run %s", name, cfg.search.num_samples, parent.run_id)
    try:
        base = base_model_test(cfg, test_set)
        parent.log_metrics({f"base_test_{k}": v for k, v in base.metrics.items()})
        trials = run_sweep(cfg, prep=prep, num_layers=layers, fresh=fresh, parent_tracker=parent)
        completed = [t for t in trials if t.status == "completed" and t.model_path]
        if not completed:
            raise ClpRayError(f"no trial of sweep {name} completed ({', '.join(f'{t.trial_id}: {t.status}' for t in trials)})")
        best = max(completed, key=lambda t: t.dev_metric if t.dev_metric is not None else -1.0)
        best_cfg = apply_params(cfg, best.params)
        log.info("best trial %s: %s = %.4f; evaluating on %s", best.trial_id, METRIC, best.dev_metric, test_set.name)
        # A local copy when the trials' storage is remote (s3://...).
        best_model = local_folder(best.model_path, Path(cfg.train.output_dir).resolve() / name)
        res = evaluate(Embedder.from_pretrained(best_model), test_set, batch_size=cfg.eval.batch_size,
                       chunk_size=cfg.eval.chunk_size, top_k=cfg.eval.top_k, show_progress=True)
        test = res.metrics
        vs_base = compare(base, res, "ndcg@10")
        log.info("test nDCG@10: best trial %.4f, base model %.4f (paired t-test p = %.3g)", vs_base.mean_b,
                 vs_base.mean_a, vs_base.p_value)
        eval_hash = test_set.content_hash()
        parent.log_metrics({f"best_{METRIC}": best.dev_metric, **{f"test_{k}": v for k, v in test.items()},
                            "p_value_vs_base": vs_base.p_value})
        plot_dir = Path(cfg.train.output_dir).resolve() / name / "plots"
        write_sweep_plots(trials, cfg, plot_dir)
        parent.log_artifacts(plot_dir, "plots")

        reg_name = registered_model_name(cfg)
        tags = {**{f"param.{k}": v for k, v in best.params.items()}, "moe.layers": best_cfg.moe.layers,
                f"dev_{metric_key('ndcg@10')}": best.dev_metric,
                **{f"test_{metric_key(k)}": v for k, v in test.items()},
                **{f"base_test_{metric_key(k)}": v for k, v in base.metrics.items()}, "p_value_vs_base": vs_base.p_value,
                "data_hash": prep.data_hash, "eval_set_hash": eval_hash, "git_commit": git_commit(),
                "trial_id": best.trial_id, "sweep": name}
        mv = log_embedder_model(parent, best_model, registered_name=reg_name, tags=tags)

        def rescore(model_uri: str) -> float:
            emb = load_registered_embedder(model_uri, parent.uri)
            return evaluate(emb, test_set, batch_size=cfg.eval.batch_size, chunk_size=cfg.eval.chunk_size,
                            top_k=cfg.eval.top_k).metrics["ndcg@10"]

        promotion = promote_if_better(parent.uri, reg_name, mv.version, rescore=rescore,
                                      base_score=base.metrics["ndcg@10"])
        parent.set_tags({"clp_ray.registered_version": mv.version, "clp_ray.promotion": promotion.reason})
    except (JobInterrupted, KeyboardInterrupt):
        parent.end("KILLED")  # resumable: the next run of the same command continues this MLflow run
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    return TuneOutcome(name, trials, best, best_cfg, test, reg_name, mv.version, promotion, parent.run_id,
                       base.metrics, vs_base.p_value, list(prep.data_files))
