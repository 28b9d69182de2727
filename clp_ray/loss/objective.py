"""The CLP training objective: the Embedder, the CLP loss and the MoE router losses in one forward.

One DeepSpeed engine call per micro-batch: queries, passages (positive + hard negatives) and the
negatives' own queries are encoded — plain padded batches, or :class:`~clp_ray.data.Bucketed` ones
(length-sorted sub-batches put back in order) — and combined into :class:`ObjectiveOutput`::

    loss = clp_loss(q, p, neg_q).loss + mean over encoder calls of router_loss(encoder)

``clp_loss`` (:mod:`clp_ray.loss.clp`) is ``(1-λ)·InfoNCE(τ) + λ·mean(1 - cos(neg, neg_q))``;
the negative queries are not encoded at all when λ = 0. Per-expert token fractions and router
entropy are taken from the passage batch, which holds most of the tokens.

**Gradient caching** (``chunk_size``, ``train.grad_cache``): each encoder call is run in chunks of
``chunk_size`` sequences through non-reentrant activation checkpointing. The forward keeps only
each chunk's inputs and embeddings, the loss is taken over the whole batch, and during the one
backward every chunk is re-run with its graph (from the random state its first forward saw:
dropout and router jitter replay exactly) and back-propagates the embedding gradient the loss
gave it — Gao et al.'s GradCache, with autograd doing the caching. Memory for activations is one
chunk's, whatever the batch; the cost is a second forward. One backward means DeepSpeed's ZeRO
hooks see each gradient once. The router losses of a call are combined from its chunks' per-expert
sums (:func:`clp_ray.model.moe.combine_aux`), so they equal the whole call's, not a mean of chunk losses.

**Unified M3 training** (``m3``, ``model.m3_heads: unified``): every encoder call also gives the
sparse and ColBERT outputs (:class:`~clp_ray.model.m3.ModeOutput`), and the loss is
:func:`clp_ray.loss.m3.unified_loss` instead of ``clp_loss``; chunks and length buckets are
put back together by :func:`clp_ray.model.m3.cat_outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from clp_ray.data import Bucketed
from clp_ray.loss.clp import clp_loss
from clp_ray.loss.m3 import unified_loss
from clp_ray.loss.router import router_loss, router_stats
from clp_ray.loss.settings import LossSettings
from clp_ray.model.m3 import MODES, ModeOutput, cat_outputs
from clp_ray.model.moe import RouterAux, combine_aux, moe_layers

Batch = Union[dict, Bucketed]


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # what the optimizer minimises: CLP loss + router loss
    contrastive: torch.Tensor
    penalty: torch.Tensor
    router_loss: torch.Tensor
    router_stats: dict[str, float] = field(default_factory=dict)  # moe/<layer>/... of the passage batch
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # unified M3 training's loss terms


@dataclass
class _Encoded:
    """One batch's outputs and what its encoder calls left for the router loss."""

    out: ModeOutput
    router_loss: torch.Tensor
    calls: int
    stats: dict[str, float]

    @property
    def emb(self) -> torch.Tensor:
        """The dense embeddings."""
        return self.out.dense


class CLPObjective(nn.Module):
    """``forward(query, passage, neg_query=None) -> ObjectiveOutput`` (see the module docstring)."""

    def __init__(self, embedder: nn.Module, loss: LossSettings, chunk_size: Optional[int] = None, checkpoint: bool = True):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.embedder = embedder
        self.loss = loss
        self.chunk_size = chunk_size
        self.checkpoint = checkpoint  # False: the same chunks with their graphs kept (a reference for tests)
        # Dense training leaves BGE-M3's heads (if any) untouched; the unified loss needs all three modes.
        self.modes = MODES if loss.unified else None

    def encode(self, batch: Batch, collect_stats: bool = False) -> _Encoded:
        parts = batch.chunks if isinstance(batch, Bucketed) else [batch]
        outs, r_loss, stats = [], None, {}
        for part in parts:
            if self.chunk_size is None:
                outs.append(_as_output(self.embedder(**part, modes=self.modes)))
                term = router_loss(self.embedder.encoder)
            else:
                out, term = self._encode_in_chunks(part)
                outs.append(out)
            r_loss = term if r_loss is None else r_loss + term
            if collect_stats:
                for k, v in router_stats(self.embedder.encoder).items():
                    stats[k] = stats.get(k, 0.0) + v / len(parts)
        out = cat_outputs(outs)
        if isinstance(batch, Bucketed):
            out = out.index_select(batch.inverse)
        return _Encoded(out, r_loss, len(parts), stats)

    def _encode_in_chunks(self, part: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder call as chunks of ``chunk_size`` rows (each cut to its own longest row),
        checkpointed; its router loss combined over the chunks. Leaves the combined statistics on
        the MoE layers' ``aux`` for :func:`router_stats`."""
        ids, mask = part["input_ids"], part["attention_mask"]
        layers = [m for _, m in moe_layers(self.embedder.encoder)]
        outs, auxes = [], []
        n_out = 1 if self.modes is None else 3
        for start in range(0, ids.shape[0], self.chunk_size):
            m = mask[start:start + self.chunk_size]
            width = max(int(m.sum(1).max()), 1)
            if m[:, width:].any():  # left padding: keep the full width
                width = m.shape[1]
            args = (ids[start:start + self.chunk_size, :width], m[:, :width])
            if self.checkpoint and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(self._chunk_forward, *args, use_reentrant=False,
                                                        preserve_rng_state=True)
            else:
                out = self._chunk_forward(*args)
            if self.modes is None:
                outs.append(ModeOutput(dense=out[0]))
            else:
                outs.append(ModeOutput(out[0], out[1], out[2], args[1][:, 1:]))
            auxes.append(out[n_out:])
        total = None
        for i, layer in enumerate(layers):
            aux = combine_aux(layer.num_experts, [_sums_aux(a[5 * i:5 * i + 5]) for a in auxes])
            layer.aux = aux
            term = layer.balance_coef * aux.balance_loss + layer.z_coef * aux.z_loss
            total = term if total is None else total + term
        if total is None:
            total = outs[0].dense.new_zeros(())
        return cat_outputs(outs), total

    def _chunk_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The chunk's embeddings (dense; with ``m3`` dense, sparse and ColBERT) and, per MoE layer,
        the sums its router losses are made of: returned rather than read off the layers
        afterwards, so that they are outputs of the checkpointed region (recomputed with it)."""
        result = self.embedder(input_ids=input_ids, attention_mask=attention_mask, modes=self.modes)
        emb = (result,) if self.modes is None else (result.dense, result.sparse, result.colbert)
        sums: list[torch.Tensor] = []
        for _, m in moe_layers(self.embedder.encoder):
            a = m.aux
            sums += [a.slot_counts, a.tokens.to(a.prob_sum.dtype), a.prob_sum, a.lse_sq_sum, a.entropy_sum]
        return (*emb, *sums)

    def forward(self, query: Batch, passage: Batch, neg_query: Optional[Batch] = None) -> ObjectiveOutput:
        encoded = [self.encode(query), self.encode(passage, collect_stats=True)]
        if neg_query is not None and self.loss.require_neg_q:
            encoded.append(self.encode(neg_query))
        q, p = encoded[0].out, encoded[1].out
        nq = encoded[2].out if len(encoded) > 2 else None
        r_loss = sum(e.router_loss for e in encoded) / sum(e.calls for e in encoded)
        with torch.autocast(q.dense.device.type, enabled=False):  # the loss in fp32 under bf16 autocast
            return self._loss(q.float(), p.float(), None if nq is None else nq.float(), r_loss, encoded[1].stats)

    def _loss(self, q: ModeOutput, p: ModeOutput, nq: Optional[ModeOutput], r_loss: torch.Tensor,
              stats: dict[str, float]) -> ObjectiveOutput:
        if self.loss.unified:
            m3 = unified_loss(q, p, nq, self.loss)
            return ObjectiveOutput(m3.loss + r_loss, m3.contrastive, m3.penalty, r_loss, stats, m3.components)
        s = self.loss
        out = clp_loss(q.dense, p.dense, None if nq is None else nq.dense, temperature=s.temperature, lam=s.lam,
                       cross_device=s.cross_device)
        return ObjectiveOutput(out.loss + r_loss, out.contrastive, out.penalty, r_loss, stats)


def _as_output(result) -> ModeOutput:
    return result if isinstance(result, ModeOutput) else ModeOutput(dense=result)


def _sums_aux(sums) -> RouterAux:
    """A chunk's per-layer sums (as :meth:`CLPObjective._chunk_forward` returns them) as the
    fields :func:`clp_ray.model.moe.combine_aux` reads."""
    counts, n, prob_sum, lse_sq_sum, entropy_sum = sums
    unused = n.new_zeros(())
    return RouterAux(unused, unused, counts, unused, n, counts, prob_sum, lse_sq_sum, entropy_sum)
