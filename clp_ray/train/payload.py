"""What the driver sends to every Ray Train worker: one typed payload instead of a dict of strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from clp_ray.config import ExperimentConfig

if TYPE_CHECKING:  # the payload module imports without torch, datasets or MLflow (tested)
    from clp_ray.evaluation.dev_set import DevSet


@dataclass(frozen=True)
class DataRef:
    """Validated training data, as the workers reload it (the validator's report, reduced)."""

    files: tuple[str, ...]
    content_hash: str
    on_duplicate: str = "keep"


@dataclass(frozen=True)
class TrackingRef:
    """The MLflow run rank 0 logs to (created by the driver)."""

    uri: str
    run_id: str


@dataclass(frozen=True)
class WorkerPayload:
    cfg: ExperimentConfig
    ds_config: dict
    data: DataRef
    run_dir: str  # the run's folder on the run storage (the fault-injection marker lives there)
    # Where the workers load the model from, decided on the driver (resolve_model_path): an absolute
    # folder, a hub id, or "tiny" (built on each node). Workers never resolve it again.
    model_source: str
    tracking: Optional[TrackingRef] = None
    dev: Optional[DevSet] = None  # the dev set the driver built; None: the worker builds the same one
    dev_init: Optional[dict[str, float]] = None  # the untrained model's dev metrics; None: the worker computes them
    prefix_cache: Optional[str] = None  # the frozen-prefix cache's folder (clp_ray/model/prefix_cache.py); None: off

    def as_loop_config(self) -> dict:
        """Ray Train's ``train_loop_config`` (a dict) carrying this payload."""
        return {"payload": self}
