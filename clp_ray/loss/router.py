"""The MoE router's auxiliary loss and statistics, read from the MoE layers' last forward.

``router_loss = sum over MoE layers of balance_coef * balance + z_coef * z``: Switch Transformer's
load-balancing loss (``num_experts * sum_e fraction_e * mean_prob_e``) and ST-MoE's z-loss
(``mean(logsumexp(router logits)^2)``), both computed per layer by
:class:`clp_ray.model.moe.MoEFeedForward` on the real (unpadded) tokens. The training objective
(:mod:`clp_ray.loss.objective`) adds it to the retrieval loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from clp_ray.model.moe import moe_layers


def router_loss(model: nn.Module) -> torch.Tensor:
    """Sum over MoE layers of ``balance_coef * balance + z_coef * z`` from their last forward."""
    total: Optional[torch.Tensor] = None
    for _, m in moe_layers(model):
        if m.aux is None:
            continue
        term = m.balance_coef * m.aux.balance_loss + m.z_coef * m.aux.z_loss
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters())
        return torch.zeros((), device=p.device)
    return total


def router_stats(model: nn.Module) -> dict[str, float]:
    """Per-layer token fraction per expert, router entropy and the raw aux losses, for logging."""
    stats: dict[str, float] = {}
    for layer_idx, (name, m) in enumerate(moe_layers(model)):
        if m.aux is None:
            continue
        tag = _layer_tag(name, layer_idx)
        for e, f in enumerate(m.aux.expert_fraction.tolist()):
            stats[f"moe/{tag}/expert{e}_frac"] = f
        stats[f"moe/{tag}/entropy"] = float(m.aux.entropy)
        stats[f"moe/{tag}/balance_loss"] = float(m.aux.balance_loss.detach())
        stats[f"moe/{tag}/z_loss"] = float(m.aux.z_loss.detach())
    return stats


def _layer_tag(name: str, fallback: int) -> str:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layer" and b.isdigit():
            return f"layer{b}"
    return f"moe{fallback}"
