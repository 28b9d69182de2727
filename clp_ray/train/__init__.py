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

from typing import TYPE_CHECKING

# The light modules eagerly (this also keeps the function ``deepspeed_config`` from being shadowed
# by its submodule of the same name); the heavy ones on first use.
from clp_ray.train.deepspeed_config import deepspeed_config as deepspeed_config
from clp_ray.train.deepspeed_config import resolve_precision as resolve_precision
from clp_ray.train.payload import DataRef as DataRef
from clp_ray.train.payload import TrackingRef as TrackingRef
from clp_ray.train.payload import WorkerPayload as WorkerPayload
from clp_ray.util.lazy import lazy_exports

_EXPORTS = {
    "engine": ["build_engine", "save_final_model"],
    "preflight": ["PreparedRun", "check_moe_layers", "check_resources", "check_storage", "model_settings", "prepare",
                  "resolve_model_path", "run_hash", "run_lock", "run_name", "storage_path"],
    "run": ["RUNTIME_ENV_VARS", "TrainResult", "checkpoint_model", "ensure_ray", "explain_failure", "fit",
            "open_tracking", "run_training"],
    "schedule": ["StepPlan", "lr_lambda", "plan_steps"],
    "worker": ["CKPT_TAG", "MODEL_DIR", "STATE_FILE", "TrainWorker", "train_worker"],
}
# Lazy: Ray Train's controller unpickles a WorkerPayload and must not import the whole trainer.
__getattr__, __dir__, _lazy = lazy_exports(__name__, _EXPORTS)
__all__ = sorted([*_lazy, "DataRef", "TrackingRef", "WorkerPayload", "deepspeed_config", "resolve_precision"])

if TYPE_CHECKING:  # for type checkers and IDEs; the names resolve lazily at run time
    from clp_ray.train.engine import build_engine, save_final_model  # noqa: F401
    from clp_ray.train.preflight import (  # noqa: F401
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
    from clp_ray.train.run import (  # noqa: F401
        RUNTIME_ENV_VARS,
        TrainResult,
        checkpoint_model,
        ensure_ray,
        explain_failure,
        fit,
        open_tracking,
        run_training,
    )
    from clp_ray.train.schedule import StepPlan, lr_lambda, plan_steps  # noqa: F401
    from clp_ray.train.worker import CKPT_TAG, MODEL_DIR, STATE_FILE, TrainWorker, train_worker  # noqa: F401
