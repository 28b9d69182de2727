"""The loss's settings, built once from ``cfg.loss`` (and ``model.m3_heads``) and handed to the
objective whole: τ, λ, cross-device negatives, and BGE-M3's unified-loss options. Their defaults
are the config schema's (:class:`clp_ray.config.sections.LossConfig`: the paper's τ 0.02, λ 0.1),
written there once."""

from __future__ import annotations

from dataclasses import dataclass, field

from clp_ray.config import ExperimentConfig, LossConfig

_DEFAULTS = LossConfig()


@dataclass(frozen=True)
class LossSettings:
    temperature: float = _DEFAULTS.temperature  # τ of every InfoNCE term
    lam: float = _DEFAULTS.lam  # λ: weight of the CLP penalty
    cross_device: bool = _DEFAULTS.cross_device_negatives  # score against every rank's passages
    unified: bool = False  # BGE-M3's unified loss (model.m3_heads: unified) instead of clp_loss
    penalty_modes: tuple[str, ...] = tuple(_DEFAULTS.m3.penalty_modes)  # unified: modes with the penalty
    weights: dict[str, float] = field(default_factory=lambda: _DEFAULTS.m3.ensemble_weights.model_dump())
    sparse_loss_weight: float = _DEFAULTS.m3.sparse_loss_weight
    self_distill: bool = _DEFAULTS.m3.self_distill

    @property
    def require_neg_q(self) -> bool:
        """Whether records need ``neg_q``: the penalty pulls each negative towards its own query."""
        return self.lam > 0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> LossSettings:
        loss, m3 = cfg.loss, cfg.loss.m3
        return cls(temperature=loss.temperature, lam=loss.lam, cross_device=loss.cross_device_negatives,
                   unified=cfg.model.m3_heads == "unified", penalty_modes=tuple(m3.penalty_modes),
                   weights=m3.ensemble_weights.model_dump(), sparse_loss_weight=m3.sparse_loss_weight,
                   self_distill=m3.self_distill)


def needs_hard_negatives(lam: float, group_size: int) -> bool:
    """The rule both the trainer and the sweep check: λ > 0 acts on hard negatives, so a group
    (``data.train_group_size``) must hold at least one besides the positive."""
    return lam > 0 and group_size < 2
