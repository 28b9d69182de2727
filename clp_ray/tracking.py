"""MLflow tracking: experiments per language, runs, params, metrics and artifacts.

The local default is ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``<cwd>/mlartifacts`` —
absolute paths, because Ray workers run in other directories. The experiment and the run are
created by the driver before any worker starts (two processes creating a SQLite DB at once race);
workers only log to a run id they are given.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from clp_ray.config import ExperimentConfig
from clp_ray.errors import ClpRayError

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000
_BATCH = 100


def tracking_uri(cfg: ExperimentConfig) -> str:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.tracking.experiment_prefix}-{cfg.lang}"


def registered_model_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.tracking.registered_model_prefix}-{cfg.lang}"


def metric_key(name: str) -> str:
    """MLflow keys allow ``[A-Za-z0-9_-. /]`` only: ``dev_ndcg@10`` -> ``dev_ndcg_at_10``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name.replace("@", "_at_"))


class Tracker:
    """A thin handle on one MLflow run (safe to pickle into Ray workers: it holds only strings)."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def ensure_experiment(cfg: ExperimentConfig) -> tuple[str, str]:
    """(tracking uri, experiment id) — created if missing, with an explicit artifact location."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    name = experiment_name(cfg)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return uri, exp.experiment_id
        artifacts = cfg.tracking.artifact_location
        if artifacts is None and uri.startswith("sqlite:"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        return uri, client.create_experiment(name, artifact_location=artifacts)
    except MlflowException as e:
        raise ClpRayError(f"MLflow at {uri}: {e.message.splitlines()[0]}") from None


def start_run(cfg: ExperimentConfig, run_name: str, *, tags: Optional[dict] = None, parent_run_id: Optional[str] = None) -> Tracker:
    from mlflow import MlflowClient

    uri, exp_id = ensure_experiment(cfg)
    all_tags = {"clp_ray.lang": cfg.lang, "clp_ray.config_hash": cfg.config_hash(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = MlflowClient(tracking_uri=uri).create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    return Tracker(uri, run.info.run_id)


def load_registered_embedder(uri: str):
    """Load the Embedder behind an MLflow model URI (``models:/name@alias``, ``runs:/...``)."""
    raise ClpRayError(f"{uri}: loading models from the MLflow registry is not available yet (see the README)")
