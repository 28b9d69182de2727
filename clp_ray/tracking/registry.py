"""The MLflow model registry: logging an Embedder folder as a pyfunc model, lineage tags, and the
``@champion`` promotion rule (beat the base model and the champion on the same evaluation set;
NaN never wins or blocks; promotions of one model serialised by a file lock).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import DataType, ParamSchema, ParamSpec

from clp_ray.errors import ClpRayError
from clp_ray.model.embedder import Embedder
from clp_ray.tracking.pyfunc import PREDICT_BATCH_SIZE, PREDICT_KIND, PREDICT_OUTPUT, EmbedderPyfunc
from clp_ray.tracking.runs import Tracker
from clp_ray.util.locks import lock_file, serialised
from clp_ray.util.redact import redact

log = logging.getLogger(__name__)


def log_embedder_model(tracker: Tracker, model_dir: str | os.PathLike, *, registered_name: Optional[str] = None,
                       tags: Optional[dict] = None):
    """Log ``model_dir`` as a pyfunc on the tracker's run and, with ``registered_name``, register it
    as a new model version (tags attached). Returns the ModelVersion or the logged model info."""
    # Without a params schema MLflow drops `params` at predict time (with only a warning). No input
    # schema: MLflow would turn the list of texts into a DataFrame; _as_text_list checks it.
    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("batch_size", DataType.long, PREDICT_BATCH_SIZE),
                                                                ParamSpec("kind", DataType.string, PREDICT_KIND),
                                                                ParamSpec("output", DataType.string, PREDICT_OUTPUT)]))
    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=tracker.run_id), warnings.catch_warnings(), tempfile.TemporaryDirectory() as code:
        # MLflow warns when no input example is given, but one would make it load and run the
        # model at logging time; the params-only signature above is complete without it.
        warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
        # The model carries the clp-ray code that defines it (MLflow puts code_paths first on
        # sys.path where it loads the model) and pins what that code imports, so any env manager
        # can build its environment: "clp-ray" is on no package index.
        info = mlflow.pyfunc.log_model(
            name="model", python_model=EmbedderPyfunc(), artifacts={"embedder": str(model_dir)},
            code_paths=[str(package_code(Path(code)))], pip_requirements=serving_requirements(), signature=signature,
        )
    if not registered_name:
        return info
    client = tracker.client
    version = mlflow.register_model(info.model_uri, registered_name, tags={k: redact(str(v)) for k, v in (tags or {}).items()})
    return client.get_model_version(registered_name, version.version)


# What the pyfunc's code imports where a model is served (clp_ray.tracking.pyfunc -> clp_ray.model.embedder).
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "numpy", "tqdm")


def serving_requirements() -> list[str]:
    """Pins of the distributions the pyfunc imports, at the versions installed here."""
    return [f"{name}=={_installed_version(name)}" for name in SERVING_DISTRIBUTIONS]


def _installed_version(name: str) -> str:
    version = importlib.metadata.version(name)
    # A local build tag (torch's "+cpu") names a wheel of the PyTorch index, not of PyPI.
    return version.split("+", 1)[0]


def package_code(into: Path) -> Path:
    """A copy of the clp_ray package's Python files (no data assets, no bytecode) under ``into``."""
    src = Path(__file__).resolve().parents[1]  # the clp_ray package, not this subpackage
    dst = into / "clp_ray"
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir())
                                                        or n in ("__pycache__", "assets")])
    return dst


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
    A file lock (:mod:`clp_ray.util.locks`): it holds across processes on one machine (a local or
    SQLite store, or jobs submitted to one head); MLflow has no compare-and-set for aliases."""
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
    return Embedder.from_pretrained(registered_model_folder(uri, tracking_uri))
