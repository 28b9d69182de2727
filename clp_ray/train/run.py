"""Driving one training run: Ray up, the MLflow run, ``TorchTrainer.fit()`` over
:func:`~clp_ray.train.worker.train_worker`, and where the model ended up (``jobs/train.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs
import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from clp_ray.config import ExperimentConfig
from clp_ray.data.samples import check_data_language
from clp_ray.errors import ClpRayError
from clp_ray.evaluation.dev_set import DevSetInfo
from clp_ray.tracking.runs import Tracker, resume_or_start_run
from clp_ray.train.payload import TrackingRef, WorkerPayload
from clp_ray.train.prefix_fill import prefill
from clp_ray.train.preflight import (
    PreparedRun,
    check_moe_layers,
    check_resources,
    prepare,
    resolve_model_path,
    run_lock,
)
from clp_ray.train.worker import MODEL_DIR, train_worker
from clp_ray.util.cache import cache_root
from clp_ray.util.storage import filesystem, folder_exists, join, local_folder, location

log = logging.getLogger(__name__)

MLFLOW_ID_FILE = "mlflow_run_id"  # in output_folder(): a re-run continues the MLflow run it names

RUNTIME_ENV_VARS = {
    "TOKENIZERS_PARALLELISM": "false",
    # Reports wait for the controller's poll; a shorter poll keeps small local runs snappy.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
}


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Connect to the cluster a job was submitted to (``RAY_ADDRESS`` / ``ray.address``), else
    start a local Ray instance."""
    if ray.is_initialized():
        return
    env = dict(RUNTIME_ENV_VARS)
    if not cfg.ray.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for k, v in env.items():
        os.environ.setdefault(k, v)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # One local node cannot be preempted: no PreemptionWatcher actor (a process, ~2 s of imports)
        # next to every run's controller, unless the user asks for one.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(extensions_dir())
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 runtime_env={"env_vars": env}, log_to_driver=True)


def extensions_dir() -> Path:
    """Where this interpreter's workers keep DeepSpeed's JIT-built ops (the CPU shared-memory comm op).

    torch's default, ``~/.cache/torch_extensions/py311_cpu``, is shared by every environment with the
    same Python: two venvs with different torch builds rebuild each other's op (~40 s at the start of
    a run). One folder per interpreter keeps each build."""
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return cache_root() / "torch_extensions" / f"{Path(sys.prefix).name}-{key}"


def output_folder(prep: PreparedRun) -> Path:
    """The run's local folder under ``train.output_dir`` (MLflow run id, local model copies)."""
    return Path(prep.cfg.train.output_dir).resolve() / prep.name


@dataclass
class TrainResult:
    name: str
    run_dir: str
    checkpoint_path: Optional[str]
    model_path: Optional[str]
    metrics: dict[str, Any]
    mlflow_run_id: Optional[str] = None
    local_model_path: Optional[str] = None  # model_path, or its local copy when the storage is remote
    data_files: list[str] = field(default_factory=list)  # the training files read (folders expanded)
    dev_set: Optional[DevSetInfo] = None  # what the dev metrics were computed on


def fit(prep: PreparedRun, *, tracker: Optional[Tracker] = None, callbacks: Optional[list] = None) -> TrainResult:
    """Run the TorchTrainer for a prepared run; returns where the model is and its dev metrics."""
    cfg, r = prep.cfg, prep.cfg.ray
    resources = {"CPU": r.cpus_per_worker, **r.resources_per_worker}
    if r.use_gpu:
        resources["GPU"] = max(r.gpus_per_worker, 1)
    payload = WorkerPayload(cfg, prep.ds_config, prep.data, prep.run_dir, cfg.model.name_or_path,
                            TrackingRef(tracker.uri, tracker.run_id) if tracker else None, prep.dev, prep.dev_init,
                            prep.prefix_cache)
    trainer = TorchTrainer(
        train_worker, train_loop_config=payload.as_loop_config(),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=prep.name, storage_path=prep.storage, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep)),
    )
    result = trainer.fit()
    ckpt = result.checkpoint
    # Locations on the run storage: local paths, or URIs when it is remote (s3://...).
    ckpt_path = location(prep.storage, ckpt.path) if ckpt else None
    model_path = checkpoint_model(ckpt_path) if ckpt_path else None
    return TrainResult(prep.name, prep.run_dir, ckpt_path, model_path, dict(result.metrics or {}),
                       tracker.run_id if tracker else None, data_files=prep.data_files,
                       dev_set=prep.dev.info if prep.dev else None)


def finished_result(prep: PreparedRun) -> Optional[TrainResult]:
    """The result of this run when its storage already holds its final checkpoint and model (the
    run name is the config and data hash, so it is the same training); else None."""
    fs, path = filesystem(prep.run_dir)
    # Ray Train's record of the run's checkpoints; absent before a first report.
    if fs.get_file_info(f"{path}/checkpoint_manager_snapshot.json").type == pafs.FileType.NotFound:
        return None
    try:
        result = Result.from_path(prep.run_dir)
    except (RuntimeError, OSError, ValueError) as e:  # unreadable: let a real run sort it out
        log.warning("run %s: cannot read its earlier result (%s); running it", prep.name, e)
        return None
    metrics = dict(result.metrics or {})
    ckpt_path = location(prep.storage, result.checkpoint.path) if result.checkpoint else None
    model_path = checkpoint_model(ckpt_path) if ckpt_path else None
    if not (metrics.get("final") and model_path):
        return None
    id_file = output_folder(prep) / MLFLOW_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    return TrainResult(prep.name, prep.run_dir, ckpt_path, model_path, metrics, run_id, data_files=prep.data_files,
                       dev_set=prep.dev.info if prep.dev else None)


def checkpoint_model(ckpt_location: str) -> Optional[str]:
    """The model folder in a checkpoint (a location on the run storage, see
    :func:`clp_ray.util.storage.location`); None when the checkpoint holds no model."""
    model = join(ckpt_location, MODEL_DIR)
    return model if folder_exists(model) else None


def explain_failure(e: BaseException) -> str:
    """The first line of each worker's error, instead of a wall of Ray tracebacks."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        parts = []
        for rank, err in sorted(failures.items()):
            text = str(err).strip().splitlines()
            parts.append(f"rank {rank}: {text[-1] if text else type(err).__name__}")
        return "training failed: " + "; ".join(parts)
    text = str(e).strip().splitlines()
    return f"training failed: {text[-1] if text else type(e).__name__}"


def open_tracking(prep: PreparedRun) -> Tracker:
    """The MLflow run of this training; a re-run of the same run name continues the same MLflow run."""
    cfg = prep.cfg

    def on_start(tracker: Tracker) -> None:
        tracker.log_params({**cfg.flat(), **prep.settings_params(), **(prep.dev.info.as_params() if prep.dev else {})})
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        tracker.log_text(json.dumps(prep.data_report, indent=2), "data_report.json")
        tracker.log_text(json.dumps(prep.model_settings, indent=2), "model_settings.json")

    return resume_or_start_run(cfg, output_folder(prep) / MLFLOW_ID_FILE, prep.name,
                               tags={"clp_ray.data_hash": prep.data_hash, "clp_ray.kind": "train"}, on_start=on_start)


def run_training(cfg: ExperimentConfig) -> TrainResult:
    """jobs/train.py: checks, Ray, MLflow, fit, final artifacts. User errors raise ClpRayError."""
    check_data_language(cfg)  # before the model is resolved (the offline rebuild takes seconds)
    cfg = resolve_model_path(cfg)
    check_moe_layers(cfg)
    prep = prepare(cfg)
    with run_lock(cfg, prep.name):  # before any cluster work: a second identical command stops here
        done = finished_result(prep)
        if done:
            log.info("run %s already finished at step %s: nothing to train (its model: %s); change the config "
                     "or delete %s to train again", prep.name, done.metrics.get("step"), done.model_path, prep.run_dir)
            done.local_model_path = str(local_folder(done.model_path, output_folder(prep)))
            return done
        ensure_ray(cfg)
        check_resources(cfg)
        prefill(cfg, prep)
        tracker = open_tracking(prep)
        log.info("run %s: storage %s, MLflow run %s (%s)", prep.name, prep.run_dir, tracker.run_id, tracker.uri)
        try:
            result = fit(prep, tracker=tracker)
        except TrainingFailedError as e:
            tracker.end("FAILED")
            raise ClpRayError(explain_failure(e)) from None
        except BaseException:
            tracker.end("KILLED")
            raise
        if result.model_path:
            # On remote storage (s3://...) a local copy under train.output_dir, for MLflow and the user.
            result.local_model_path = str(local_folder(result.model_path, output_folder(prep)))
            tracker.log_artifacts(result.local_model_path, "model")
        tracker.end("FINISHED")
    return result
