"""MLflow tracking: experiments per language, runs, params, metrics and artifacts.

The local default is ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``<cwd>/mlartifacts`` —
absolute paths, because Ray workers run in other directories. The experiment and the run are
created by the driver before any worker starts (two processes creating a SQLite DB at once race);
workers only log to a run id they are given.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import mlflow.pyfunc

from clp_ray.config import ExperimentConfig
from clp_ray.errors import ClpRayError
from clp_ray.redact import redact

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


def check_tracking(cfg: ExperimentConfig) -> str:
    """Reach the tracking store once on the driver, before any cluster work: an unwritable SQLite
    path, an unknown URI scheme or a server that is down otherwise fails only when the first run
    is opened, after Ray has started (a server that is down, after minutes of retries)."""
    from mlflow import MlflowClient

    from clp_ray.atomic import check_writable

    uri = tracking_uri(cfg)
    if cfg.tracking.tracking_uri:
        where = cfg.cite("tracking.tracking_uri")
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        where = f"$MLFLOW_TRACKING_URI = {uri}"
    else:
        where = f"the default MLflow store {uri}"
    if uri.startswith("sqlite:///"):
        check_writable(uri.removeprefix("sqlite:///"), where)
    with mock.patch.dict(os.environ, _QUICK_HTTP):  # restored afterwards, unset ones unset again
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:  # any failure (unknown scheme, refused, auth, a broken DB) means the same here
            text = getattr(e, "message", None) or str(e) or type(e).__name__
            raise ClpRayError(f"{where}: cannot use this MLflow tracking store: "
                              f"{type(e).__name__}: {text.strip().splitlines()[0]}") from None
    return uri


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
    run = MlflowClient(tracking_uri=uri).create_run(exp_id, run_name=run_name,
                                                    tags={k: redact(str(v)) for k, v in all_tags.items()})
    return Tracker(uri, run.info.run_id)


def resume_or_start_run(cfg: ExperimentConfig, id_file: Path, run_name: str, *, tags: dict,
                        on_start: Callable[[Tracker], None], resume: bool = True) -> Tracker:
    """Continue the MLflow run whose id ``id_file`` remembers (a re-run of the same training or
    sweep), or start one, let ``on_start`` log its params/artifacts, and remember its id."""
    from mlflow.exceptions import MlflowException

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
    import random
    import time

    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return start_run(cfg, run_name, **kw)
        except (MlflowException, ClpRayError) as e:
            if i == attempts - 1 or "locked" not in str(e).lower():
                raise
            time.sleep(0.2 * (2 ** i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# The registered model: an MLflow pyfunc wrapping an Embedder folder.


PREDICT_BATCH_SIZE = 32  # texts per forward pass unless predict gets params={"batch_size": N}
# What the texts are unless predict gets params={"kind": "passage"}: it picks the model's prefix
# (E5's "query: " / "passage: ") and max length. Queries are what a serving endpoint embeds most.
PREDICT_KIND = "query"


class EmbedderPyfunc(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc.load_model(uri).predict(["text", ...])`` -> float32 [N, D] normalised
    embeddings; the Embedder folder (MoE layers included) is the model's ``embedder`` artifact."""

    # predict has no type hints on purpose, and MLflow warns about that at class creation, i.e. on
    # every job start. A `list[str]` hint would make MLflow infer a signature without a params
    # schema (so `params={"batch_size": ...}` is dropped) and turn a multi-column DataFrame into its
    # first column silently; _as_text_list checks the input instead. This MLflow attribute (the
    # one its ChatModel uses) skips the type-hint check and thus the warning; nothing else.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from clp_ray.modeling import Embedder

        self.embedder = Embedder.from_pretrained(context.artifacts["embedder"])

    def predict(self, context, model_input, params=None):
        texts = _as_text_list(model_input)
        params = params or {}
        batch_size = int(params.get("batch_size", PREDICT_BATCH_SIZE))
        kind = params.get("kind", PREDICT_KIND)
        if kind not in ("query", "passage"):
            raise ValueError(f"params['kind'] must be 'query' or 'passage', got {kind!r}")
        return self.embedder.encode(texts, batch_size=batch_size, kind=kind).numpy().astype("float32")


def _as_text_list(model_input) -> list[str]:
    # pandas input (e.g. from a serving endpoint): take its only column.
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):
        if len(model_input.columns) != 1:
            raise TypeError(f"expected one column of strings, got columns {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0].tolist()
    if isinstance(model_input, str) or not isinstance(model_input, (list, tuple)):
        raise TypeError(f"predict expects a list of strings, got {type(model_input).__name__}")
    bad = [i for i, t in enumerate(model_input) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"predict expects a list of strings; item {bad[0]} is {type(model_input[bad[0]]).__name__}")
    return list(model_input)


def log_embedder_model(tracker: Tracker, model_dir: str | os.PathLike, *, registered_name: Optional[str] = None,
                       tags: Optional[dict] = None):
    """Log ``model_dir`` as a pyfunc on the tracker's run and, with ``registered_name``, register it
    as a new model version (tags attached). Returns the ModelVersion or the logged model info."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import DataType, ParamSchema, ParamSpec

    # Without a params schema MLflow drops `params` at predict time (with only a warning). No input
    # schema: MLflow would turn the list of texts into a DataFrame; _as_text_list checks it.
    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("batch_size", DataType.long, PREDICT_BATCH_SIZE),
                                                                ParamSpec("kind", DataType.string, PREDICT_KIND)]))
    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=tracker.run_id), warnings.catch_warnings():
        # MLflow warns when no input example is given, but one would make it load and run the
        # model at logging time; the params-only signature above is complete without it.
        warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
        # clp-ray itself must be installed where the model is loaded (it defines the model class).
        info = mlflow.pyfunc.log_model(
            name="model", python_model=EmbedderPyfunc(), artifacts={"embedder": str(model_dir)},
            pip_requirements=["clp-ray"], signature=signature,
        )
    if not registered_name:
        return info
    client = tracker.client
    version = mlflow.register_model(info.model_uri, registered_name, tags={k: redact(str(v)) for k, v in (tags or {}).items()})
    return client.get_model_version(registered_name, version.version)


@dataclass
class Promotion:
    promoted: bool
    reason: str
    version: str
    previous: Optional[str] = None


def _score(tags: dict, key: str) -> float:
    """A version's metric tag as a float; NaN when it is missing or not a number."""
    try:
        return float(tags.get(key, "nan"))
    except (TypeError, ValueError):
        return math.nan


def promotion_lock(uri: str, name: str):
    """Serialise promotions of one registered model: reading the champion and moving the alias
    are two MLflow calls, and two jobs interleaving them could both promote (the worse one last).
    A file lock (:mod:`clp_ray.locks`): it holds across processes on one machine (a local or
    SQLite store, or jobs submitted to one head); MLflow has no compare-and-set for aliases."""
    from clp_ray.locks import lock_file, serialised

    return serialised(lock_file("promote", uri, name))


def promote_if_better(uri: str, name: str, version: str, *, metric_tag: str = "test_ndcg_at_10",
                      eval_hash_tag: str = "eval_set_hash", alias: str = "champion",
                      rescore: Optional[Callable[[str], float]] = None,
                      base_score: Optional[float] = None) -> Promotion:
    """Move ``alias`` to ``version`` only if its test metric beats the base model's
    (``base_score``, the untrained model on the same test set; the first version included) and the
    current champion's on the same evaluation set. A champion scored on another set is re-scored
    with ``rescore(model_uri)`` when given; otherwise the version stays unpromoted. A NaN or
    missing metric never wins, and a champion without one never blocks. The reason goes into a
    version tag; the whole decision runs under :func:`promotion_lock`."""
    with promotion_lock(uri, name):
        return _promote(uri, name, version, metric_tag, eval_hash_tag, alias, rescore, base_score)


def _promote(uri, name, version, metric_tag, eval_hash_tag, alias, rescore, base_score) -> Promotion:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)

    def decide(promoted: bool, reason: str, previous: Optional[str] = None) -> Promotion:
        if promoted:
            client.set_registered_model_alias(name, alias, version)
        client.set_model_version_tag(name, version, "clp_ray.promotion" if promoted else "clp_ray.not_promoted_reason",
                                     reason)
        return Promotion(promoted, reason, version, previous)

    new = client.get_model_version(name, version)
    new_score = _score(new.tags, metric_tag)
    if math.isnan(new_score):
        return decide(False, f"not promoted: its {metric_tag} is missing or not a number ({new.tags.get(metric_tag)!r})")
    if base_score is not None and not new_score > base_score:
        return decide(False, f"not promoted: {metric_tag} {new_score:.4f} does not beat the base model's {base_score:.4f}")
    try:
        champ = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        champ = None
    if champ is None:
        return decide(True, f"first version: promoted to @{alias} with {metric_tag} {new_score:.4f}")
    if champ.version == version:
        return Promotion(True, f"version {version} already holds @{alias}", version, champ.version)
    champ_score = _score(champ.tags, metric_tag)
    if champ.tags.get(eval_hash_tag) != new.tags.get(eval_hash_tag):
        if rescore is None:
            return decide(False, f"not promoted: champion v{champ.version} was evaluated on another set "
                                 f"({champ.tags.get(eval_hash_tag)} vs {new.tags.get(eval_hash_tag)})", champ.version)
        champ_score = float(rescore(f"models:/{name}/{champ.version}"))
    if math.isnan(champ_score) or new_score > champ_score:
        shown = "no usable score" if math.isnan(champ_score) else f"{champ_score:.4f}"
        return decide(True, f"promoted: {metric_tag} {new_score:.4f} > champion v{champ.version} {shown}", champ.version)
    return decide(False, f"not promoted: {metric_tag} {new_score:.4f} <= champion v{champ.version} {champ_score:.4f}",
                  champ.version)


def registered_model_folder(uri: str, tracking_uri: Optional[str] = None) -> str:
    """The Embedder folder inside an MLflow model (``models:/name@alias``, ``models:/name/3``,
    ``runs:/...``) of the store ``tracking_uri`` (jobs pass the config's, :func:`tracking_uri`; None:
    MLflow's own default), downloaded to a local folder."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    except (MlflowException, OSError) as e:
        raise ClpRayError(f"cannot load {uri} from MLflow at {mlflow.get_tracking_uri()}: {str(e).splitlines()[0]}") from None
    if "embedder" not in artifacts:
        raise ClpRayError(f"{uri} is not a clp-ray embedding model (its pyfunc has no 'embedder' artifact)")
    return str(local / artifacts["embedder"]["path"])


def load_registered_embedder(uri: str, tracking_uri: Optional[str] = None):
    """The Embedder behind an MLflow model URI, loaded from its folder with the folder's settings."""
    from clp_ray.modeling import Embedder

    return Embedder.from_pretrained(registered_model_folder(uri, tracking_uri))
