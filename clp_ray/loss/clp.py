"""The CLP loss: InfoNCE over in-batch + hard negatives, plus the negative-query penalty.

Batch layout (``B`` queries, group size ``G``, embeddings L2-normalised, dimension ``D``):

- ``q``      ``[B, D]``         query embeddings
- ``p``      ``[B*G, D]``       per query: its positive, then its ``G-1`` hard negatives
- ``neg_q``  ``[B*(G-1), D]``   ``neg_q[i*(G-1)+j]`` is the query that hard negative ``j`` of
  query ``i`` (passage ``p[i*G+1+j]``) is relevant to

Math::

    InfoNCE = CE(q @ p.T / tau, target_i = i*G)            # all B*G passages are candidates
    penalty = mean_{i,j} (1 - cos(neg_ij, neg_q_ij))        # pull each negative to its own query
    loss    = (1 - lam) * InfoNCE + lam * penalty

From "CLP: Contrastive Learning with Penalty" (arXiv 2412.17364). The penalty pairs every negative
with *its own* query for any ``B`` (the research code only lined them up at ``B = 1``). With
``lam = 0`` or ``neg_q is None`` the loss is exactly InfoNCE, i.e. sentence-transformers'
``MultipleNegativesRankingLoss`` with hard negatives and scale ``1/tau``.

Cross-device negatives: inside an initialised process group with world size > 1, ``q``, ``p`` and
``neg_q`` are all-gathered so every rank scores its queries against all ranks' passages. The
gather's backward all-reduces (sums) the gradient, so after the usual data-parallel gradient
averaging the parameters receive exactly the gradient of the loss on the concatenated batch.
Every rank must pass the same ``B`` and ``G``.

Example::

    >>> out = clp_loss(q, p, neg_q, temperature=0.02, lam=0.1)
    >>> out.loss.backward(); log(out.contrastive, out.penalty)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class CLPLossOutput:
    loss: torch.Tensor
    contrastive: torch.Tensor
    penalty: torch.Tensor  # zero when lam == 0 or neg_q is None


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's
    slice (gloo has no reduce_scatter, so this uses all_reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Scores and cosines of bf16/fp16 embeddings are computed in fp32; fp32/fp64 stay as they are.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _GatherWithGrad.apply(x)


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def clp_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    neg_q: Optional[torch.Tensor] = None,
    *,
    temperature: float,
    lam: float,
    cross_device: bool = True,
) -> CLPLossOutput:
    """CLP loss for one batch; see the module docstring for shapes and math."""
    if q.dim() != 2 or p.dim() != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"q must be [B, D] and p [B*G, D]; got {tuple(q.shape)} and {tuple(p.shape)}")
    b = q.shape[0]
    if b == 0 or p.shape[0] % b:
        raise ValueError(f"p has {p.shape[0]} rows, not a multiple of B={b}")
    g = p.shape[0] // b
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if lam > 0 and neg_q is None:
        raise ValueError("lam > 0 needs neg_q (the query of each hard negative)")
    use_penalty = lam > 0 and neg_q is not None and g > 1
    if use_penalty and tuple(neg_q.shape) != (b * (g - 1), q.shape[1]):
        raise ValueError(f"neg_q must be [B*(G-1), D] = [{b * (g - 1)}, {q.shape[1]}], got {tuple(neg_q.shape)}")

    if cross_device and distributed_world() > 1:
        q, p = gather_with_grad(q), gather_with_grad(p)
        if use_penalty:
            neg_q = gather_with_grad(neg_q)
        b = q.shape[0]

    q, p = _upcast(q), _upcast(p)
    scores = q @ p.T / temperature
    target = torch.arange(b, device=q.device) * g
    contrastive = F.cross_entropy(scores, target)
    if not use_penalty:
        return CLPLossOutput(contrastive, contrastive, contrastive.new_zeros(()))
    negatives = p.view(b, g, -1)[:, 1:].reshape(-1, p.shape[1])
    penalty = (1 - F.cosine_similarity(negatives, _upcast(neg_q), dim=-1)).mean()
    loss = (1 - lam) * contrastive + lam * penalty
    return CLPLossOutput(loss, contrastive, penalty)
