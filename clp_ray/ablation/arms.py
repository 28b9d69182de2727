"""The ablation's arms: each a name plus config overrides, resolved into one full config per arm
and one run per arm x seed, all checked before any training.

Every arm trains on the same data, steps, batch and schedule: overrides of the keys that decide
those (and of the sections that name where things go) are refused. A seed is ``train.seed`` plus
its index: it changes the router's initialisation and dropout, never the data order or the dev
split (``data.seed``). When an arm turns MoE off while the config trains only MoE layers
(``moe.train_only: moe``), the arm trains ``site``: the dense weights the MoE arm upcycles, so the
arms differ in the loss and in MoE only, not in which part of the model learns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from clp_ray.config import AblationConfig, ExperimentConfig, SearchConfig, apply_overrides
from clp_ray.errors import ConfigError
from clp_ray.train.preflight import run_hash

log = logging.getLogger(__name__)

# Keys an arm may not change: the arms must share data, steps, batch, schedule and destinations.
FIXED_SECTIONS = ("data", "eval", "ablation", "search", "ray", "tracking", "mining")
FIXED_KEYS = ("lang", "train.epochs", "train.max_steps", "train.per_device_batch_size", "train.gradient_accumulation_steps",
              "train.seed", "train.eval_every_steps", "train.output_dir", "train.storage_path", "train.run_name")


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict[str, Any]
    train: bool
    cfg: ExperimentConfig  # the experiment's config with this arm's overrides


@dataclass(frozen=True)
class RunSpec:
    """One arm x seed: a training run (or, for an untrained arm, one evaluation of the model)."""

    arm: str
    seed: Optional[int]  # None for an untrained arm
    name: str  # names its Ray Train run, its MLflow child run and its result folder
    cfg: ExperimentConfig
    train: bool


def _flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _check_fixed(where: str, overrides: dict[str, Any]) -> None:
    for key in _flatten(overrides):
        if key.split(".")[0] in FIXED_SECTIONS or any(key == k or key.startswith(k + ".") for k in FIXED_KEYS):
            raise ConfigError(f"{where}: {key}: an arm cannot change it (every arm trains on the same data, steps, "
                              "batch and schedule, and writes to the same places)")


def _arm_config(cfg: ExperimentConfig, index: int, name: str, overrides: dict[str, Any]) -> ExperimentConfig:
    where = f"{cfg.origin('ablation.arms')}: ablation.arms[{index}] ({name}).overrides"
    _check_fixed(where, overrides)
    arm_cfg = apply_overrides(cfg, overrides, where)
    flat = _flatten(overrides)
    if not arm_cfg.moe.enabled and arm_cfg.moe.train_only == "moe" and "moe.train_only" not in flat:
        log.info("arm %s: MoE off, so it trains moe.site of moe.layers (the dense weights the MoE arm upcycles)", name)
        arm_cfg = apply_overrides(arm_cfg, {"moe.train_only": "site"}, where)
    # What a run is named by: the ablation's own settings and the search space do not change a run.
    return arm_cfg.model_copy(update={"ablation": AblationConfig(), "search": SearchConfig()})


def resolve_arms(cfg: ExperimentConfig) -> list[Arm]:
    """The configured arms as full configs; an unknown or forbidden override key fails here, with
    its key path, before any training."""
    return [Arm(a.name, dict(a.overrides), a.train, _arm_config(cfg, i, a.name, a.overrides))
            for i, a in enumerate(cfg.ablation.arms)]


def seeds(cfg: ExperimentConfig) -> list[int]:
    return [cfg.train.seed + i for i in range(cfg.ablation.seeds)]


def plan_runs(cfg: ExperimentConfig, arms: list[Arm], data_hash: str) -> list[RunSpec]:
    """One run per trained arm x seed, one per untrained arm; names hash the run's whole config and
    the data, so an unchanged arm keeps its finished runs when other arms or the seed count change."""
    runs = []
    for arm in arms:
        if not arm.train:
            runs.append(RunSpec(arm.name, None, f"ablate-{cfg.lang}-{arm.name}-{run_hash(arm.cfg, data_hash)}", arm.cfg, False))
            continue
        for seed in seeds(cfg):
            c = arm.cfg.model_copy(update={"train": arm.cfg.train.model_copy(update={"seed": seed})})
            runs.append(RunSpec(arm.name, seed, f"ablate-{cfg.lang}-{arm.name}-s{seed}-{run_hash(c, data_hash)}", c, True))
    return runs


def base_arm(cfg: ExperimentConfig) -> Optional[str]:
    """The first untrained arm (the model as loaded), which every arm is also compared against."""
    return next((a.name for a in cfg.ablation.arms if not a.train), None)
