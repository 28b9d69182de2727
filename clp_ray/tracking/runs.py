"""MLflow tracking: experiments per language, runs, params, metrics and artifacts.

The local default is ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``<cwd>/mlartifacts`` —
absolute paths, because Ray workers run in other directories. The experiment and the run are
created by the driver before any worker starts (two processes creating a SQLite DB at once race);
workers only log to a run id they are given.
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from clp_ray.config import ExperimentConfig
from clp_ray.errors import ClpRayError, JobInterrupted
from clp_ray.util.atomic import check_writable
from clp_ray.util.redact import redact

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000
_BATCH = 100


def tracking_uri(cfg: ExperimentConfig) -> str:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def with_driver_tracking(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the MLflow store resolved here, on the driver: trials run in working directories
    of their own, where the default URI (a SQLite file in the working directory) is another database."""
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": tracking_uri(cfg)})})


@contextmanager
def ending(tracker: Tracker) -> Iterator[Tracker]:
    """End ``tracker``'s run with the block: FINISHED, KILLED on an interrupt (the next run of the
    same command resumes it), FAILED on any other error."""
    try:
        yield tracker
    except (JobInterrupted, KeyboardInterrupt):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


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
        return MlflowClient(tracking_uri=self.uri)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(metric_key(k), redact(str(v))[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact(str(v)))

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


# MLflow retries a failed HTTP request 7 times with exponential backoff (about 5 minutes for a
# server that is down): right for a blip in a long job, not for a first contact.
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards (unset ones unset again)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(cfg: ExperimentConfig) -> str:
    """Reach the tracking store once on the driver, before any cluster work: an unwritable SQLite
    path, an unknown URI scheme or a server that is down otherwise fails only when the first run
    is opened, after Ray has started (a server that is down, after minutes of retries)."""
    uri = tracking_uri(cfg)
    if cfg.tracking.tracking_uri:
        where = cfg.cite("tracking.tracking_uri")
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        where = f"$MLFLOW_TRACKING_URI = {uri}"
    else:
        where = f"the default MLflow store {uri}"
    if uri.startswith("sqlite:///"):
        check_writable(uri.removeprefix("sqlite:///"), where)
    with _environment(_QUICK_HTTP):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:  # any failure (unknown scheme, refused, auth, a broken DB) means the same here
            text = getattr(e, "message", None) or str(e) or type(e).__name__
            raise ClpRayError(f"{where}: cannot use this MLflow tracking store: "
                              f"{type(e).__name__}: {text.strip().splitlines()[0]}") from None
    return uri


def ensure_experiment(cfg: ExperimentConfig) -> tuple[str, str]:
    """(tracking uri, experiment id) — created if missing, with an explicit artifact location."""
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
    uri, exp_id = ensure_experiment(cfg)
    all_tags = {"clp_ray.lang": cfg.lang, "clp_ray.config_hash": cfg.config_hash(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = MlflowClient(tracking_uri=uri).create_run(exp_id, run_name=run_name,
                                                    tags={k: redact(str(v)) for k, v in all_tags.items()})
    return Tracker(uri, run.info.run_id)


def resume_or_start_run(cfg: ExperimentConfig, id_file: Path, run_name: str, *, tags: dict,
                        on_start: Callable[[Tracker], None], resume: bool = True) -> Tracker:
    """Continue the MLflow run whose id ``id_file`` remembers (a re-run of the same training or
    sweep), or start one, let ``on_start`` log its params/artifacts, and remember its id."""
    if resume and id_file.exists():
        tracker = Tracker(tracking_uri(cfg), id_file.read_text().strip())
        try:
            tracker.client.update_run(tracker.run_id, status="RUNNING")
            return tracker
        except MlflowException:
            log.warning("MLflow run %s from %s not found; starting a new one", tracker.run_id, id_file)
    tracker = start_run(cfg, run_name, tags=tags)
    on_start(tracker)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(tracker.run_id)
    return tracker


def start_run_retrying(cfg: ExperimentConfig, run_name: str, *, attempts: int = 8, **kw) -> Tracker:
    """start_run, retried: concurrent trials writing one SQLite file can hit 'database is locked'."""
    for i in range(attempts):
        try:
            return start_run(cfg, run_name, **kw)
        except (MlflowException, ClpRayError) as e:
            if i == attempts - 1 or "locked" not in str(e).lower():
                raise
            time.sleep(0.2 * (2 ** i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
