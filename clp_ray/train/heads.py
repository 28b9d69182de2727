"""What training does with BGE-M3's sparse and ColBERT heads (``model.m3_heads``).

``keep``: the heads are frozen and unused by the loss, so every saved model carries them exactly as
loaded (:func:`clp_ray.m3.save_heads` writes them back byte for byte). ``unified``: they train with
the encoder under :func:`clp_ray.m3_loss.unified_loss`; a model that has none gets new ones
(seeded like the rest of the run, identical on every rank), as FlagEmbedding starts them.
"""

from __future__ import annotations

import logging
from typing import Optional

from clp_ray.config import ExperimentConfig
from clp_ray.m3 import new_heads
from clp_ray.m3_loss import M3LossSettings

log = logging.getLogger(__name__)


def apply_heads_policy(embedder, policy: str) -> tuple[int, int]:
    """Freeze (``keep``) or train (``unified``, creating them if missing) the heads, after
    ``moe.train_only`` set the encoder's ``requires_grad``; returns (trainable, total) counts."""
    if policy == "unified" and embedder.heads is None:
        log.warning("model.m3_heads = unified: the model has no sparse/ColBERT heads; starting new ones")
        embedder.heads = new_heads(embedder.dim, next(embedder.encoder.parameters()).dtype)
    if embedder.heads is not None:
        embedder.heads.requires_grad_(policy == "unified")
    params = list(embedder.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def m3_loss_settings(cfg: ExperimentConfig) -> Optional[M3LossSettings]:
    """The unified loss's settings for ``model.m3_heads: unified``; None for dense training."""
    if cfg.model.m3_heads != "unified":
        return None
    m3 = cfg.loss.m3
    return M3LossSettings(temperature=cfg.loss.temperature, lam=cfg.loss.lam, cross_device=cfg.loss.cross_device_negatives,
                          penalty_modes=tuple(m3.penalty_modes), weights=m3.ensemble_weights.model_dump(),
                          sparse_loss_weight=m3.sparse_loss_weight, self_distill=m3.self_distill)
