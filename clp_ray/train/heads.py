"""What training does with BGE-M3's sparse and ColBERT heads (``model.m3_heads``).

``keep``: the heads are frozen and unused by the loss, so every saved model carries them exactly as
loaded (:func:`clp_ray.model.m3.save_heads` writes them back byte for byte). ``unified``: they train with
the encoder under :func:`clp_ray.loss.m3.unified_loss`; a model that has none gets new ones
(seeded like the rest of the run, identical on every rank), as FlagEmbedding starts them.
"""

from __future__ import annotations

import logging

from clp_ray.model.m3 import new_heads

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
