"""The search space, in one table: each searched parameter's name, the config value it sets, its
distribution (from the ``search`` section) and its value in the paper's setting, which runs first.
The Optuna space, the first point, the trial's config and the sweep plots all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from clp_ray.config import ExperimentConfig
from clp_ray.errors import ConfigError
from clp_ray.loss.settings import LossSettings, needs_hard_negatives

PAPER = LossSettings()  # the paper's λ and τ (the schema's defaults): the first trial's values


def searches_moe(cfg: ExperimentConfig) -> bool:
    return cfg.moe.enabled and cfg.search.search_moe


def _block(cfg: ExperimentConfig) -> int:
    return cfg.search.block_size if cfg.search.layer_mode == "block" else 1


@dataclass(frozen=True)
class SearchParam:
    name: str  # the Tune/Optuna parameter
    config_key: str  # the config value it sets
    distribution: Callable[[ExperimentConfig, int], BaseDistribution]  # (cfg, encoder layers) -> distribution
    paper: Callable[[ExperimentConfig, int], Any]  # its value in the CLP paper's setting
    moe: bool = False  # searched only with moe.enabled and search.search_moe
    to_config: Callable[[Any, ExperimentConfig], Any] = lambda v, cfg: v

    def first(self, cfg: ExperimentConfig, num_layers: int) -> Any:
        """The paper's value, moved into the configured range or choices."""
        dist, value = self.distribution(cfg, num_layers), self.paper(cfg, num_layers)
        if isinstance(dist, CategoricalDistribution):
            return value if value in dist.choices else dist.choices[0]
        return min(max(value, dist.low), dist.high)


SEARCH_PARAMS = (
    SearchParam("lam", "loss.lam", lambda c, n: FloatDistribution(*c.search.lam), lambda c, n: PAPER.lam),
    SearchParam("temperature", "loss.temperature", lambda c, n: FloatDistribution(*c.search.temperature, log=True),
                lambda c, n: PAPER.temperature),
    SearchParam("learning_rate", "train.learning_rate", lambda c, n: FloatDistribution(*c.search.learning_rate, log=True),
                lambda c, n: c.train.learning_rate),
    SearchParam("num_experts", "moe.num_experts", lambda c, n: CategoricalDistribution(list(c.search.num_experts)),
                lambda c, n: 2, moe=True),
    SearchParam("top_k", "moe.top_k", lambda c, n: CategoricalDistribution(list(c.search.top_k)), lambda c, n: 1, moe=True),
    # The first upcycled layer; the paper upcycles the last one.
    SearchParam("moe_layer", "moe.layers", lambda c, n: IntDistribution(0, n - _block(c)), lambda c, n: n - _block(c),
                moe=True, to_config=lambda v, c: list(range(v, v + _block(c)))),
)


def active_params(cfg: ExperimentConfig) -> list[SearchParam]:
    return [p for p in SEARCH_PARAMS if searches_moe(cfg) or not p.moe]


def check_space(cfg: ExperimentConfig, num_layers: int) -> None:
    s = cfg.search
    if searches_moe(cfg):
        if max(s.top_k) > min(s.num_experts):
            raise ConfigError(f"{cfg.cite('search.top_k')} has a value above the smallest of "
                              f"{cfg.cite('search.num_experts')}: every (experts, top_k) pair must be valid")
        if s.layer_mode == "block" and s.block_size > num_layers:
            raise ConfigError(f"{cfg.cite('search.block_size')} exceeds the model's {num_layers} layers; "
                              f"{cfg.cite('model.name_or_path')}")
    if needs_hard_negatives(s.lam[1], cfg.data.train_group_size):
        raise ConfigError(f"{cfg.cite('search.lam')} allows lam > 0, which needs hard negatives, but "
                          f"{cfg.cite('data.train_group_size')}: it must be >= 2")


def distributions(cfg: ExperimentConfig, num_layers: int) -> dict[str, BaseDistribution]:
    return {p.name: p.distribution(cfg, num_layers) for p in active_params(cfg)}


class SearchSpace:
    """The define-by-run space for OptunaSearch: the table's distributions, resolved once (Tune
    pickles the searcher, so this holds plain distributions, not the table's functions)."""

    def __init__(self, cfg: ExperimentConfig, num_layers: int):
        self.dists = distributions(cfg, num_layers)

    def __call__(self, trial) -> None:
        for name, d in self.dists.items():
            if isinstance(d, CategoricalDistribution):
                trial.suggest_categorical(name, list(d.choices))
            elif isinstance(d, IntDistribution):
                trial.suggest_int(name, d.low, d.high)
            else:
                trial.suggest_float(name, d.low, d.high, log=d.log)


def points_to_evaluate(cfg: ExperimentConfig, num_layers: int) -> list[dict]:
    """The paper's setting (moved into the configured bounds), learning rate from ``train``."""
    return [{p.name: p.first(cfg, num_layers) for p in active_params(cfg)}]


def apply_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The trial's config: the base config with the sampled values written in."""
    data = cfg.to_dict()
    for p in SEARCH_PARAMS:
        if p.name in params:
            section, key = p.config_key.split(".")
            data[section][key] = p.to_config(params[p.name], cfg)
    return ExperimentConfig.model_validate(data)


def trial_params(config: dict) -> dict:
    """The searched values of a Tune trial's config."""
    names = {p.name for p in SEARCH_PARAMS}
    return {k: v for k, v in config.items() if k in names}
