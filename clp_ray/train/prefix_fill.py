"""Filling the frozen-prefix cache before the workers start: the exact texts training will meet.

``sample_group`` is deterministic in (seed, epoch, index), so the driver knows every query,
passage and negative query each epoch will encode. It computes their prefix states once
(:class:`~clp_ray.model.prefix_cache.FrozenPrefix`) into the cache folder every trial, arm and
rank then reads: concurrent trials do not each compute the same first epoch, and two ranks never
compute one text twice. Few texts (``train.prefix_fill_ray_min_texts``) are computed in-process;
many as a Ray Data job (``map_batches`` over an actor pool, one per Ray Train worker's resources,
each actor writing its own shards; the cache folder must then be shared by the nodes).
"""

from __future__ import annotations

import logging
import time

import torch

from clp_ray.config import ExperimentConfig
from clp_ray.data import load_records, sample_group
from clp_ray.evaluation.dev_set import training_split
from clp_ray.loss.settings import LossSettings
from clp_ray.model.prefix_cache import FrozenPrefix, prefix_cache_dir, trained_from
from clp_ray.model.source import load_embedder, num_encoder_layers
from clp_ray.train.deepspeed_config import resolve_precision
from clp_ray.train.preflight import PreparedRun

log = logging.getLogger(__name__)

BATCH = 64


def training_texts(cfg: ExperimentConfig, records) -> dict[str, list[str]]:
    """Every distinct text (by kind) the training epochs of ``cfg`` encode, in first-use order."""
    d, require_neg_q = cfg.data, LossSettings.from_config(cfg).require_neg_q
    seen: dict[str, dict[str, None]] = {"query": {}, "passage": {}}
    for epoch in range(cfg.train.epochs):
        for j in range(len(records)):
            g = sample_group(records[j], d.train_group_size, seed=d.seed, epoch=epoch, index=j)
            seen["query"][g.query] = None
            for p in g.passages:
                seen["passage"][p] = None
            if require_neg_q:
                for q in g.neg_queries:
                    seen["query"][q] = None
    return {k: list(v) for k, v in seen.items()}


def fill(prefix: FrozenPrefix, embedder, texts: dict[str, list[str]], batch_size: int = BATCH) -> int:
    """Compute the prefix states of ``texts`` missing from the cache (longest first, so batches pad
    little); returns how many were computed. Flushes to the cache folder."""
    before = prefix.stats.computed
    with torch.no_grad():
        for kind, items in texts.items():
            order = sorted(items, key=len, reverse=True)
            for start in range(0, len(order), batch_size):
                enc = embedder.tokenize(order[start:start + batch_size], kind=kind)
                prefix.prefix_states(enc["input_ids"].to(embedder.device), enc["attention_mask"].to(embedder.device))
    prefix.flush()
    return prefix.stats.computed - before


def prefill(cfg: ExperimentConfig, prep: PreparedRun) -> int:
    """Fill the cache for ``prep``'s training texts when its policy leaves a frozen prefix; returns
    how many sequences were computed (0: nothing to do, or everything was cached)."""
    directory = prefix_cache_dir(cfg)
    # The layer count from the model's config alone: no weights, records or texts where nothing applies.
    k = trained_from(cfg, num_encoder_layers(cfg.model)) if directory and cfg.train.prefix_fill else None
    if k is None:
        return 0
    records = load_records(prep.data, require_neg_q=LossSettings.from_config(cfg).require_neg_q,
                           group_size=cfg.data.train_group_size, max_line_bytes=cfg.data.max_line_bytes)
    train_ds, _ = training_split(records, cfg, prep.dev.info.source if prep.dev else None)
    texts = training_texts(cfg, train_ds)
    n = sum(len(v) for v in texts.values())
    started = time.perf_counter()
    if n >= cfg.train.prefix_fill_ray_min_texts:
        computed = _fill_with_ray_data(cfg, directory, k, texts)
    else:
        embedder = load_embedder(cfg.model).to(weights_dtype(cfg))
        computed = fill(FrozenPrefix(embedder.encoder, k, directory), embedder, texts)
    log.info("frozen-prefix cache: %d of the %d training texts computed before training (%.1f s)", computed, n,
             time.perf_counter() - started)
    return computed


def fill_key(cfg: ExperimentConfig) -> tuple:
    """What decides a fill: configs with equal keys fill the same entries (an ablation's seeds)."""
    m = cfg.moe
    return (prefix_cache_dir(cfg), cfg.train.prefix_fill, m.enabled, m.train_only, tuple(m.layers), str(weights_dtype(cfg)),
            LossSettings.from_config(cfg).require_neg_q, cfg.train.epochs, cfg.data.seed, cfg.data.train_group_size)


def weights_dtype(cfg: ExperimentConfig) -> torch.dtype:
    """The dtype the workers' weights have (DeepSpeed casts them for bf16/fp16): the fill computes
    with the same weights, so its entries land in the workers' namespace."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg), torch.float32)


class _FillActor:
    """One Ray Data actor: the model's prefix, filling the cache for its batches of texts."""

    def __init__(self, cfg: ExperimentConfig, directory: str, k: int):
        self.embedder = load_embedder(cfg.model).to(weights_dtype(cfg))
        if cfg.ray.use_gpu and torch.cuda.is_available():
            self.embedder.cuda()
        self.prefix = FrozenPrefix(self.embedder.encoder, k, directory)

    def __call__(self, batch: dict) -> dict:
        texts: dict[str, list[str]] = {"query": [], "passage": []}
        for text, kind in zip(batch["text"], batch["kind"]):
            texts[str(kind)].append(str(text))
        self.prefix.refresh()  # what the other actors wrote meanwhile
        return {"computed": [fill(self.prefix, self.embedder, texts)]}


def _fill_with_ray_data(cfg: ExperimentConfig, directory: str, k: int, texts: dict[str, list[str]]) -> int:
    import ray.data  # Ray is up: the job drivers start it first (clp_ray.train.run.ensure_ray)

    items = [{"text": t, "kind": k} for k, v in texts.items() for t in v]
    r = cfg.ray
    ds = ray.data.from_items(items).map_batches(
        _FillActor, fn_constructor_kwargs={"cfg": cfg, "directory": directory, "k": k}, batch_size=1024,
        concurrency=r.num_workers, num_cpus=r.cpus_per_worker,
        num_gpus=r.gpus_per_worker if r.use_gpu else 0)
    return int(sum(row["computed"] for row in ds.iter_rows()))
