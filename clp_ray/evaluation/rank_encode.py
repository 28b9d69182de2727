"""Encoding a text list across the ranks of a training run: each rank embeds 1/world of it and all
ranks get every embedding back (``all_gather_object``), so a dev evaluation over the full corpus
costs each rank 1/world of the encoding instead of all of it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class RankShardedEncoder:
    """Wraps an :class:`~clp_ray.model.embedder.Embedder` for :func:`clp_ray.evaluation.evaluator`:
    ``encode`` splits the texts over the ranks (by length, so every rank pads alike), every other
    attribute is the embedder's. Only dense output is split; other outputs are encoded whole on
    every rank. Every rank must call ``encode`` with the same texts (as the dev evaluation does)."""

    def __init__(self, embedder, rank: int, world: int):
        self.embedder, self.rank, self.world = embedder, rank, world

    def __getattr__(self, name: str):
        return getattr(self.embedder, name)

    def encode(self, texts: Sequence[str], *, output="dense", **kwargs):
        if self.world == 1 or output != "dense" or not dist.is_initialized():
            return self.embedder.encode(texts, output=output, **kwargs)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        mine = order[self.rank :: self.world]
        part = self.embedder.encode([texts[i] for i in mine], output=output, **kwargs)
        parts: list = [None] * self.world
        dist.all_gather_object(parts, (mine, part))
        out = torch.empty((len(texts), self.embedder.dim), dtype=torch.float32)
        for idx, emb in parts:
            if idx:
                out[torch.as_tensor(idx)] = emb
        return out
