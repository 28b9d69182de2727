"""Groups (a positive and hard negatives with their own queries), rank shards, batches and collation."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from clp_ray.errors import DataError
from clp_ray.model.settings import EmbedSettings


@dataclass
class Group:
    query: str
    passages: list[str]  # positive first, then group_size - 1 negatives
    neg_queries: list[str]  # aligned with passages[1:]


def sample_group(rec: dict, group_size: int, *, seed: int, epoch: int, index: int) -> Group:
    """One positive and ``group_size - 1`` negatives (with their own ``neg_q``), sampled without
    replacement when there are enough negatives, with replacement otherwise. Deterministic in
    (seed, epoch, index)."""
    rng = random.Random(f"{seed}/{epoch}/{index}")
    pos = rec["pos"][rng.randrange(len(rec["pos"]))]
    k = group_size - 1
    negs = rec["neg"]
    if k == 0:
        picks: list[int] = []
    elif len(negs) >= k:
        picks = rng.sample(range(len(negs)), k)
    else:
        picks = [rng.randrange(len(negs)) for _ in range(k)]
    neg_q = rec.get("neg_q") or []
    return Group(rec["query"], [pos] + [negs[j] for j in picks], [neg_q[j] for j in picks] if neg_q else [])


def shard_indices(n: int, *, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """This rank's share of a seeded per-epoch permutation: every example lands on exactly one rank."""
    perm = list(range(n))
    random.Random(f"{seed}/shuffle/{epoch}").shuffle(perm)
    return perm[rank::world]


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Batches each rank runs per epoch; equal on all ranks (the longest shard, rounded up)."""
    return math.ceil(math.ceil(n / world) / batch_size)


def rank_batches(n: int, *, rank: int, world: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one rank and epoch. All ranks get the same number of full batches (needed
    for cross-device negatives and lock-step optimizer steps): a shorter shard's last batch wraps
    around to the start of that shard, so examples repeat only there."""
    idx = shard_indices(n, rank=rank, world=world, seed=seed, epoch=epoch)
    steps = steps_per_epoch(n, world, batch_size)
    need = steps * batch_size
    if not idx:
        raise DataError(f"{n} training records cannot feed {world} workers")
    padded = (idx * (need // len(idx) + 1))[:need]
    return [padded[i : i + batch_size] for i in range(0, need, batch_size)]


@dataclass
class Bucketed:
    """Texts tokenized into length-sorted sub-batches, each padded only to its own longest text.

    ``chunks[k]`` holds ``input_ids``/``attention_mask`` of consecutive texts in length order;
    ``inverse[i]`` is the row of text ``i`` in the concatenated chunk outputs. Padding a batch of
    B*G passages to its single longest one wastes about half the compute on typical data; sorting
    into buckets cuts that waste while every text still goes through the same model.
    """

    chunks: list[dict]
    inverse: Any  # LongTensor [N]

    def to(self, device) -> Bucketed:
        return Bucketed([{k: v.to(device) for k, v in c.items()} for c in self.chunks], self.inverse.to(device))

    @property
    def num_tokens(self) -> int:
        return sum(int(c["attention_mask"].sum()) for c in self.chunks)

    def __len__(self) -> int:
        return int(self.inverse.shape[0])


class Collator:
    """Tokenizes a list of groups into query, passage and negative-query batches.

    Queries and negative queries get the settings' ``query_prefix`` and ``query_max_len``, passages
    ``passage_prefix`` and ``passage_max_len`` — the model's own :class:`EmbedSettings`, as in
    evaluation (:meth:`for_embedder`). ``bucket_size`` > 0 returns :class:`Bucketed` batches (length-sorted
    sub-batches of that many texts); 0 returns plain padded ``input_ids``/``attention_mask`` dicts.
    """

    def __init__(self, tokenizer, settings: EmbedSettings, bucket_size: int = 0):
        self.tokenizer = tokenizer
        self.settings = settings
        self.bucket_size = bucket_size

    @classmethod
    def for_embedder(cls, embedder, bucket_size: int = 0) -> Collator:
        return cls(embedder.tokenizer, embedder.settings, bucket_size)

    def _tok(self, texts: list[str], kind: str):
        prefix, max_len = self.settings.prefix(kind), self.settings.max_len(kind)
        if prefix:
            texts = [prefix + t for t in texts]
        if not self.bucket_size:
            return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                                       return_tensors="pt", return_token_type_ids=False))

        enc = self.tokenizer(texts, truncation=True, max_length=max_len, return_token_type_ids=False,
                             return_attention_mask=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
        chunks = []
        for start in range(0, len(order), self.bucket_size):
            part = [{"input_ids": enc[i]} for i in order[start : start + self.bucket_size]]
            chunks.append(dict(self.tokenizer.pad(part, return_tensors="pt", return_attention_mask=True)))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return Bucketed(chunks, inverse)

    def __call__(self, groups: list[Group]) -> dict[str, Any]:
        batch = {
            "query": self._tok([g.query for g in groups], "query"),
            "passage": self._tok([p for g in groups for p in g.passages], "passage"),
            "group_size": len(groups[0].passages),
        }
        neg_q = [q for g in groups for q in g.neg_queries]
        batch["neg_query"] = self._tok(neg_q, "query") if neg_q else None
        return batch
