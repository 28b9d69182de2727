"""One training run: a Ray Train ``TorchTrainer`` whose workers run DeepSpeed ZeRO on the CLP objective.

- :mod:`~clp_ray.train.preflight` — everything checked and decided before any cluster work
  (:func:`prepare` -> :class:`PreparedRun`);
- :mod:`~clp_ray.train.deepspeed_config` — the DeepSpeed config filled from the experiment config;
- :mod:`~clp_ray.train.schedule` — the step plan (shared with the sweep) and the LR schedule;
- :mod:`~clp_ray.train.payload` — what the driver sends to the workers;
- :mod:`~clp_ray.train.engine` — the DeepSpeed engine and checkpoint state;
- :mod:`~clp_ray.train.worker` — the per-rank loop (:class:`TrainWorker`);
- :mod:`~clp_ray.train.run` — Ray, MLflow, ``fit`` and the training job (:func:`run_training`).
"""

from clp_ray.train.deepspeed_config import deepspeed_config, resolve_precision
from clp_ray.train.engine import build_engine, save_final_model
from clp_ray.train.payload import DataRef, TrackingRef, WorkerPayload
from clp_ray.train.preflight import (
    PreparedRun,
    check_moe_layers,
    check_resources,
    check_storage,
    model_settings,
    prepare,
    resolve_model_path,
    run_hash,
    run_lock,
    run_name,
    storage_path,
)
from clp_ray.train.run import (
    RUNTIME_ENV_VARS,
    TrainResult,
    checkpoint_model,
    ensure_ray,
    explain_failure,
    fit,
    open_tracking,
    run_training,
)
from clp_ray.train.schedule import StepPlan, lr_lambda, plan_steps
from clp_ray.train.worker import CKPT_TAG, MODEL_DIR, STATE_FILE, TrainWorker, train_worker

__all__ = [
    "CKPT_TAG", "MODEL_DIR", "RUNTIME_ENV_VARS", "STATE_FILE", "DataRef", "PreparedRun", "StepPlan", "TrackingRef",
    "TrainResult", "TrainWorker", "WorkerPayload", "build_engine", "check_moe_layers", "check_resources",
    "check_storage", "checkpoint_model", "deepspeed_config", "ensure_ray", "explain_failure", "fit", "lr_lambda",
    "model_settings", "open_tracking", "plan_steps", "prepare", "resolve_model_path", "resolve_precision", "run_hash",
    "run_lock", "run_name", "run_training", "save_final_model", "storage_path", "train_worker",
]
