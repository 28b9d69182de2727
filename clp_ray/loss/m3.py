"""BGE-M3's unified fine-tuning loss (dense + sparse + ColBERT with self-knowledge distillation),
with the CLP penalty on the dense mode (and optionally the others).

With each mode's in-batch scores ``s_m = sim_m(q, p) / tau`` (``[B, B*G]``, the positive of query
``i`` at column ``i*G``) and the ensemble ``s_e = w_d·s_dense + w_s·s_sparse + w_c·s_colbert``::

    L_dense   = clp_loss(q, p, neg_q)                    # (1-λ)·InfoNCE + λ·penalty, as in dense training
    L_m       = CE(s_m, target)  (or (1-λ)·CE + λ·penalty_m for m in penalty_modes)
    L         = (L_dense + CE(s_e) + c_s·L_sparse + L_colbert) / 4
    self-distillation:  T = softmax(s_e) (no gradient);  D_m = -mean Σ T·log_softmax(s_m)
    L         = (L + (D_dense + c_s·D_sparse + D_colbert) / 3) / 2

as FlagEmbedding's ``EncoderOnlyEmbedderM3Model`` computes it (``c_s`` = 0.1, weights 1 / 0.3 / 1).
The penalty of a mode pulls each hard negative towards its own query in that mode:
``1 - cos`` of the lexical-weight vectors (sparse), ``1 - MaxSim(neg_q, neg)`` (ColBERT; MaxSim of
normalised vectors is at most 1, like a cosine). The dense loss uses cross-device negatives when
enabled; the sparse, ColBERT and ensemble scores are per rank, as in FlagEmbedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from clp_ray.loss.clp import clp_loss
from clp_ray.loss.settings import LossSettings
from clp_ray.model.m3 import ModeOutput, colbert_pair_scores, colbert_scores, sparse_scores


@dataclass
class M3LossOutput:
    loss: torch.Tensor
    contrastive: torch.Tensor  # the dense InfoNCE
    penalty: torch.Tensor  # the dense CLP penalty
    components: dict[str, torch.Tensor]  # per mode loss, penalties, ensemble and distillation terms


def mode_scores(q: ModeOutput, p: ModeOutput, temperature: float) -> dict[str, torch.Tensor]:
    """``{mode: [B, B*G] scores / temperature}`` of this rank's queries and passages."""
    return {"dense": (q.dense.float() @ p.dense.float().T) / temperature,
            "sparse": sparse_scores(q.sparse, p.sparse) / temperature,
            "colbert": colbert_scores(q.colbert, q.colbert_mask, p.colbert, p.colbert_mask) / temperature}


def mode_penalty(mode: str, p: ModeOutput, neg_q: ModeOutput, b: int, g: int) -> torch.Tensor:
    """``mean(1 - sim_mode(neg_ij, neg_q_ij))`` over every hard negative and its own query."""
    rows = (torch.arange(b, device=p.dense.device)[:, None] * g + torch.arange(1, g, device=p.dense.device)).flatten()
    if mode == "sparse":
        sim = F.cosine_similarity(p.sparse[rows].float(), neg_q.sparse.float(), dim=-1)
    else:
        sim = colbert_pair_scores(neg_q.colbert, neg_q.colbert_mask, p.colbert[rows], p.colbert_mask[rows])
    return (1 - sim).mean()


def distill(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """FlagEmbedding's ``kl_div`` distillation: cross-entropy of the student's scores against the
    teacher's soft targets (``teacher`` already a distribution, without gradient)."""
    return -(teacher * torch.log_softmax(student, dim=-1)).sum(-1).mean()


def unified_loss(q: ModeOutput, p: ModeOutput, neg_q: Optional[ModeOutput], s: LossSettings) -> M3LossOutput:
    """The loss of the module docstring for one batch (shapes as :func:`clp_ray.loss.clp.clp_loss`)."""
    b = q.dense.shape[0]
    g = p.dense.shape[0] // b
    use_penalty = s.lam > 0 and neg_q is not None and g > 1
    lam_dense = s.lam if "dense" in s.penalty_modes else 0.0
    dense = clp_loss(q.dense, p.dense, neg_q.dense if use_penalty and lam_dense > 0 else None,
                     temperature=s.temperature, lam=lam_dense if use_penalty else 0.0, cross_device=s.cross_device)
    scores = mode_scores(q, p, s.temperature)
    target = torch.arange(b, device=q.dense.device) * g
    parts = {"dense": dense.loss}
    comps: dict[str, torch.Tensor] = {}
    for mode in ("sparse", "colbert"):
        parts[mode] = F.cross_entropy(scores[mode], target)
        if use_penalty and mode in s.penalty_modes:
            comps[f"{mode}_penalty"] = mode_penalty(mode, p, neg_q, b, g)
            parts[mode] = (1 - s.lam) * parts[mode] + s.lam * comps[f"{mode}_penalty"]
    ensemble = sum(s.weights[m] * scores[m] for m in ("dense", "sparse", "colbert"))
    parts["ensemble"] = F.cross_entropy(ensemble, target)
    c = s.sparse_loss_weight
    loss = (parts["dense"] + parts["ensemble"] + c * parts["sparse"] + parts["colbert"]) / 4
    if s.self_distill:
        teacher = torch.softmax(ensemble.detach(), dim=-1)
        d = {m: distill(teacher, scores[m]) for m in ("dense", "sparse", "colbert")}
        comps["distill"] = (d["dense"] + c * d["sparse"] + d["colbert"]) / 3
        loss = (loss + comps["distill"]) / 2
    comps.update(parts)
    return M3LossOutput(loss, dense.contrastive, dense.penalty, comps)
