"""What an ablation produces: one result per run (kept on disk, so a re-run skips it), the arms'
aggregates, and the job's outcome with its ``--summary`` JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from clp_ray.ablation.stats import Comparison, Spread, seed_average, spread
from clp_ray.util.atomic import write_json

RESULT_FILE = "result.json"
TRAINED_FILE = "trained.json"


@dataclass
class RunResult:
    """One arm x seed, trained (or not) and evaluated on the test split."""

    arm: str
    seed: Optional[int]
    name: str
    model_path: str
    run_file: str  # its TREC run on the test split
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(repr=False)  # metric -> query id -> score
    eval_set_hash: str = ""
    mlflow_run_id: Optional[str] = None

    def save(self, folder: Path) -> Path:
        return write_json(folder / RESULT_FILE, asdict(self))

    @classmethod
    def load(cls, folder: Path, eval_set_hash: str) -> Optional[RunResult]:
        """The saved result, or None when there is none or it scored another evaluation set."""
        try:
            res = cls(**json.loads((folder / RESULT_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        return res if res.eval_set_hash == eval_set_hash else None


@dataclass(frozen=True)
class TrainedRun:
    """A finished training run, before its evaluation (kept on disk too: a failed evaluation does
    not cost the training)."""

    name: str
    model_path: str
    mlflow_run_id: Optional[str] = None

    def save(self, folder: Path) -> Path:
        return write_json(folder / TRAINED_FILE, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Optional[TrainedRun]:
        try:
            return cls(**json.loads((folder / TRAINED_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


@dataclass
class ArmResult:
    name: str
    overrides: dict[str, Any]
    train: bool
    runs: list[RunResult]

    def metric(self, name: str) -> Spread:
        return spread([r.metrics[name] for r in self.runs])

    def per_query(self, metric: str) -> dict[str, float]:
        return seed_average([r.per_query[metric] for r in self.runs])


@dataclass
class AblationOutcome:
    name: str
    arms: list[ArmResult]
    comparisons: list[Comparison]
    metrics: list[str]
    baseline_arm: str
    base_arm: Optional[str]
    table_path: str
    csv_path: str
    plot_path: str
    mlflow_parent_run_id: str
    trained_now: int  # training runs this invocation ran (0 when everything was already finished)

    def summary(self) -> dict:
        return {
            "ablation": self.name,
            "arms": [{"name": a.name, "overrides": a.overrides, "train": a.train,
                      "metrics": {m: asdict(a.metric(m)) for m in self.metrics},
                      "runs": [{"seed": r.seed, "model_path": r.model_path, "run_file": r.run_file,
                                "metrics": {m: r.metrics[m] for m in self.metrics}, "mlflow_run_id": r.mlflow_run_id}
                               for r in a.runs]} for a in self.arms],
            "comparisons": [asdict(c) for c in self.comparisons],
            "baseline_arm": self.baseline_arm, "base_arm": self.base_arm,
            "table_path": self.table_path, "csv_path": self.csv_path, "plot_path": self.plot_path,
            "mlflow_parent_run_id": self.mlflow_parent_run_id, "trained_now": self.trained_now,
        }
