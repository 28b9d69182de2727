"""Top-k search in BGE-M3's modes: dense, sparse (lexical), ColBERT (MaxSim) and their hybrid.

``hybrid`` scores a pair ``w_dense·s_dense + w_sparse·s_sparse + w_colbert·s_colbert`` (BGE-M3's
"Dense+Sparse+Multi-vec", weights 1 / 0.3 / 1 by default). Search is exact over the full corpus
in blocks, every mode: dense blocks are matrix products, sparse ones products of SciPy CSR
matrices, ColBERT ones MaxSim over padded token vectors (blocks sized so one block's token
scores stay under ``COLBERT_BLOCK_SCORES``). Exact ColBERT search keeps every passage's token
vectors in memory; for large corpora ``rerank_depth`` re-ranks each query's dense top-``depth``
instead (:func:`rerank_search`): only those passages are encoded in the other modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from clp_ray.model.m3 import DEFAULT_WEIGHTS, HYBRID, MODES, Encoding, colbert_scores

EVAL_MODES = (*MODES, HYBRID)
COLBERT_BLOCK_SCORES = 2**24  # token-pair scores held at once by one ColBERT block (64 MiB fp32)


def modes_for(eval_modes: Sequence[str]) -> tuple[str, ...]:
    """The encoder outputs the evaluation ``eval_modes`` need (hybrid: all three)."""
    need = {m for e in eval_modes for m in (MODES if e == HYBRID else (e,))}
    return tuple(m for m in MODES if m in need)


def mode_weights(mode: str, hybrid_weights: Optional[dict[str, float]] = None) -> dict[str, float]:
    """``{output mode: weight}`` of the scores ``mode`` adds up (one mode: just it, weight 1)."""
    if mode == HYBRID:
        return dict(hybrid_weights or DEFAULT_WEIGHTS)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    return {mode: 1.0}


@dataclass
class ModeReps:
    """One side's (queries' or passages') representations, row-aligned: ``dense`` ``[N, D]``,
    ``sparse`` CSR ``[N, V]``, ``colbert`` ``[N, L, D']`` zero-padded with ``colbert_mask`` ``[N, L]``."""

    n: int
    dense: Optional[torch.Tensor] = None
    sparse: Optional[scipy.sparse.csr_matrix] = None
    colbert: Optional[torch.Tensor] = None
    colbert_mask: Optional[torch.Tensor] = None

    @classmethod
    def from_encoding(cls, enc: Encoding, vocab_size: int) -> ModeReps:
        n = next(len(x) for x in (enc.dense, enc.sparse, enc.colbert) if x is not None)
        reps = cls(n=n, dense=enc.dense)
        if enc.sparse is not None:
            reps.sparse = _csr(enc.sparse, vocab_size)
        if enc.colbert is not None:
            lengths = torch.tensor([v.shape[0] for v in enc.colbert])
            width = max(int(lengths.max()), 1)
            reps.colbert = torch.stack([F.pad(v, (0, 0, 0, width - v.shape[0])) for v in enc.colbert])
            reps.colbert_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return reps

    def take(self, rows) -> ModeReps:
        """The rows ``rows`` (a slice or a sequence of indices)."""
        idx = np.arange(self.n)[rows]
        t = torch.as_tensor(idx, dtype=torch.long)
        return ModeReps(
            n=len(idx), dense=None if self.dense is None else self.dense[t],
            sparse=None if self.sparse is None else self.sparse[idx],
            colbert=None if self.colbert is None else self.colbert[t],
            colbert_mask=None if self.colbert_mask is None else self.colbert_mask[t])

    @property
    def width(self) -> int:
        return 0 if self.colbert is None else int(self.colbert.shape[1])


def _csr(rows: list[dict[int, float]], vocab_size: int) -> scipy.sparse.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(indptr[-1]))
    data = np.fromiter((w for r in rows for w in r.values()), dtype=np.float32, count=int(indptr[-1]))
    return scipy.sparse.csr_matrix((data, indices, indptr), shape=(len(rows), vocab_size))


def pair_scores(q: ModeReps, d: ModeReps, weights: dict[str, float]) -> torch.Tensor:
    """``[len(q), len(d)]`` float32: the ``weights``-weighted sum of each mode's scores."""
    total = torch.zeros(q.n, d.n, dtype=torch.float32)
    for mode, w in weights.items():
        if mode == "dense":
            s = (q.dense @ d.dense.T).float()
        elif mode == "sparse":
            s = torch.from_numpy(np.asarray((q.sparse @ d.sparse.T).todense(), dtype=np.float32))
        else:
            s = colbert_scores(q.colbert, q.colbert_mask, d.colbert, d.colbert_mask)
        total += w * s
    return total


def _blocks(q: ModeReps, d: ModeReps, weights: dict[str, float], chunk_size: int, query_chunk: int) -> tuple[int, int]:
    if "colbert" not in weights:
        return query_chunk, chunk_size
    d_block = min(chunk_size, 256)
    return max(1, COLBERT_BLOCK_SCORES // max(d_block * q.width * d.width, 1)), d_block


def exact_mode_search(q: ModeReps, d: ModeReps, weights: dict[str, float], k: int, *, chunk_size: int = 4096,
                      query_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of :func:`pair_scores` over all of ``d``: (scores, indices) ``[Q, min(k, N)]``."""
    k = min(k, d.n)
    qb, db = _blocks(q, d, weights, chunk_size, query_chunk)
    all_s, all_i = [], []
    for qs in range(0, q.n, qb):
        qpart = q.take(slice(qs, qs + qb))
        best_s = torch.full((qpart.n, 0), -math.inf)
        best_i = torch.zeros((qpart.n, 0), dtype=torch.long)
        for ds in range(0, d.n, db):
            s = pair_scores(qpart, d.take(slice(ds, ds + db)), weights)
            best_s, best_i = merge_topk(best_s, best_i, s, ds, k)
        all_s.append(best_s)
        all_i.append(best_i)
    return torch.cat(all_s), torch.cat(all_i)


def merge_topk(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, offset: int, k: int):
    """The top ``k`` of the running best and a new block of scores whose column 0 is ``offset``."""
    cand_s = torch.cat([best_s, s], dim=1)
    cand_i = torch.cat([best_i, torch.arange(offset, offset + s.shape[1]).expand(s.shape[0], -1)], dim=1)
    top = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
    return top.values, cand_i.gather(1, top.indices)


def rerank_search(q: ModeReps, d: ModeReps, candidates: torch.Tensor, weights: dict[str, float],
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the top-k of its ``candidates`` row (indices into ``d``) by :func:`pair_scores`."""
    all_s, all_i = [], []
    for i in range(q.n):
        cand = candidates[i]
        s = pair_scores(q.take([i]), d.take(cand.tolist()), weights)[0]
        top = s.topk(min(k, s.shape[0]))
        all_s.append(top.values)
        all_i.append(cand[top.indices])
    return torch.stack(all_s), torch.stack(all_i)
