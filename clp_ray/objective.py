"""The CLP training objective: the Embedder, the CLP loss and the MoE router losses in one forward.

One DeepSpeed engine call per micro-batch: queries, passages (positive + hard negatives) and the
negatives' own queries are encoded — plain padded batches, or :class:`~clp_ray.data.Bucketed` ones
(length-sorted sub-batches put back in order) — and combined into :class:`ObjectiveOutput`::

    loss = clp_loss(q, p, neg_q).loss + mean over encoder calls of router_loss(encoder)

``clp_loss`` (:mod:`clp_ray.losses`) is ``(1-λ)·InfoNCE(τ) + λ·mean(1 - cos(neg, neg_q))``;
the negative queries are not encoded at all when λ = 0. Per-expert token fractions and router
entropy are taken from the passage batch, which holds most of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from clp_ray.data import Bucketed
from clp_ray.losses import clp_loss
from clp_ray.moe import router_loss, router_stats

Batch = Union[dict, Bucketed]


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # what the optimizer minimises: CLP loss + router loss
    contrastive: torch.Tensor
    penalty: torch.Tensor
    router_loss: torch.Tensor
    router_stats: dict[str, float] = field(default_factory=dict)  # moe/<layer>/... of the passage batch


@dataclass
class _Encoded:
    """One batch's embeddings and what its encoder calls left for the router loss."""

    emb: torch.Tensor
    router_loss: torch.Tensor
    calls: int
    stats: dict[str, float]


class CLPObjective(nn.Module):
    """``forward(query, passage, neg_query=None) -> ObjectiveOutput`` (see the module docstring)."""

    def __init__(self, embedder: nn.Module, temperature: float, lam: float, cross_device: bool):
        super().__init__()
        self.embedder = embedder
        self.temperature = temperature
        self.lam = lam
        self.cross_device = cross_device

    def encode(self, batch: Batch, collect_stats: bool = False) -> _Encoded:
        parts = batch.chunks if isinstance(batch, Bucketed) else [batch]
        outs, r_loss, stats = [], None, {}
        for part in parts:
            outs.append(self.embedder(**part))
            term = router_loss(self.embedder.encoder)
            r_loss = term if r_loss is None else r_loss + term
            if collect_stats:
                for k, v in router_stats(self.embedder.encoder).items():
                    stats[k] = stats.get(k, 0.0) + v / len(parts)
        emb = torch.cat(outs) if len(outs) > 1 else outs[0]
        if isinstance(batch, Bucketed):
            emb = emb.index_select(0, batch.inverse)
        return _Encoded(emb, r_loss, len(parts), stats)

    def forward(self, query: Batch, passage: Batch, neg_query: Optional[Batch] = None) -> ObjectiveOutput:
        encoded = [self.encode(query), self.encode(passage, collect_stats=True)]
        if neg_query is not None and self.lam > 0:
            encoded.append(self.encode(neg_query))
        q, p = encoded[0].emb, encoded[1].emb
        nq = encoded[2].emb if len(encoded) > 2 else None
        out = clp_loss(q, p, nq, temperature=self.temperature, lam=self.lam, cross_device=self.cross_device)
        r_loss = sum(e.router_loss for e in encoded) / sum(e.calls for e in encoded)
        return ObjectiveOutput(out.loss + r_loss, out.contrastive, out.penalty, r_loss, encoded[1].stats)
