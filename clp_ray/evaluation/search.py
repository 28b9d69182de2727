"""Exact top-k inner-product search over the full corpus, in bounded-memory blocks."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from clp_ray.evaluation.m3_search import merge_topk


def exact_search(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, *, chunk_size: int = 4096, query_chunk: int = 1024,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search over the full corpus, in blocks.

    Memory is bounded by ``query_chunk x (chunk_size + k)`` scores whatever the corpus size.
    Returns (scores [Q, k'], indices [Q, k']) with k' = min(k, N), sorted by descending score.
    """
    n = corpus.shape[0]
    k = min(k, n)
    all_scores, all_idx = [], []
    starts = range(0, queries.shape[0], query_chunk)
    if show_progress:

        starts = tqdm(starts, desc="search", unit="query block")
    for qs in starts:
        q = queries[qs : qs + query_chunk]
        best_s = torch.full((q.shape[0], 0), -math.inf, dtype=torch.float32)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for cs in range(0, n, chunk_size):
            best_s, best_i = merge_topk(best_s, best_i, (q @ corpus[cs : cs + chunk_size].T).float(), cs, k)
        all_scores.append(best_s)
        all_idx.append(best_i)
    return torch.cat(all_scores), torch.cat(all_idx)
