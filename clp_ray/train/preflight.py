"""Everything about a run that is decided, checked and can fail on user input before any cluster
work: the model source and settings, the DeepSpeed config, the data (validated once), the run's
name (config *and* data) and storage, the MLflow store, the cluster's capacity, and one process
per run folder."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray

from clp_ray.config import ExperimentConfig
from clp_ray.data import load_records, validate
from clp_ray.data.samples import check_data_language
from clp_ray.errors import ClpRayError, ConfigError
from clp_ray.evaluation.dev_set import DevSet, build_dev_set, resolve_dev_source, training_split
from clp_ray.loss.settings import LossSettings, needs_hard_negatives
from clp_ray.model.embedder import settings_folder
from clp_ray.model.folder import check_max_lengths
from clp_ray.model.m3 import HEAD_FILES
from clp_ray.model.moe import normalize_layer_indices
from clp_ray.model.prefix_cache import prefix_cache_dir
from clp_ray.model.settings import ResolvedSettings, resolve
from clp_ray.model.source import is_moe_folder, num_encoder_layers, resolve_source
from clp_ray.tracking.runs import check_tracking
from clp_ray.train.deepspeed_config import deepspeed_config
from clp_ray.train.payload import DataRef
from clp_ray.util.atomic import check_writable
from clp_ray.util.locks import exclusive
from clp_ray.util.storage import filesystem, is_uri, join

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    cfg: ExperimentConfig
    name: str
    storage: str
    ds_config: dict
    data: DataRef
    data_report: dict = field(default_factory=dict)
    train_records: int = 0  # after the dev split
    # How the model embeds, resolved on the driver: {"settings": {...}, "sources": {...}}.
    model_settings: dict = field(default_factory=dict)
    dev: Optional[DevSet] = None  # what selection runs on, built once here (clp_ray/evaluation/dev_set.py)
    dev_init: Optional[dict[str, float]] = None  # the untrained model's dev metrics, when the driver has them
    prefix_cache: Optional[str] = None  # the frozen-prefix cache's folder (absolute; None: off)

    @property
    def data_files(self) -> list[str]:
        return list(self.data.files)

    @property
    def data_hash(self) -> str:
        return self.data.content_hash

    @property
    def run_dir(self) -> str:
        return join(self.storage, self.name)

    def settings_params(self) -> dict[str, Any]:
        """The resolved model settings as MLflow params (``model_settings.pooling = mean``, ...)."""
        return {f"model_settings.{k}": v for k, v in self.model_settings.get("settings", {}).items()}


def run_hash(cfg: ExperimentConfig, data_hash: str) -> str:
    """Names a run or sweep by what it trains on as well as how: re-running the same command on
    changed data starts a new run instead of resuming the old one."""
    return hashlib.sha256(f"{cfg.config_hash()}/{data_hash}".encode()).hexdigest()[:10]


def run_name(cfg: ExperimentConfig, data_hash: str) -> str:
    return cfg.train.run_name or f"train-{cfg.lang}-{run_hash(cfg, data_hash)}"


def storage_path(cfg: ExperimentConfig) -> str:
    """Ray Train/Tune storage: a URI as given, a local folder made absolute (Ray resolves storage
    with pyarrow, which rejects a relative path: ``ArrowInvalid: URI has empty scheme``)."""
    path = cfg.train.storage_path or str(Path(cfg.train.output_dir) / "ray_results")
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def check_storage(cfg: ExperimentConfig) -> None:
    """The run storage can be written (local) or reached (URI, e.g. S3 credentials and bucket),
    before any cluster work: Ray would find out in the first checkpoint."""
    path = storage_path(cfg)
    what = cfg.cite("train.storage_path") if cfg.train.storage_path else f"Ray storage {path}"
    if not is_uri(path):
        check_writable(path, what, folder=True)
        return
    try:
        fs, base = filesystem(path)
        fs.get_file_info(base)
    except Exception as e:  # pyarrow raises OSError, ArrowInvalid, ... with the store's own message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what}: cannot reach the run storage: {first}") from None


def check_resources(cfg: ExperimentConfig) -> None:
    """Fail before any worker starts when the trial can never be scheduled."""
    r = cfg.ray
    if r.autoscaling:
        return
    need = {"CPU": r.num_workers * r.cpus_per_worker}
    if r.use_gpu:
        need["GPU"] = r.num_workers * max(r.gpus_per_worker, 1)
    for k, v in r.resources_per_worker.items():
        need[k] = need.get(k, 0) + r.num_workers * v
    have = ray.cluster_resources()
    short = [f"{v:g} {k} (cluster has {have.get(k, 0):g})" for k, v in need.items() if v > have.get(k, 0) + 1e-9]
    if short:
        raise ClpRayError(
            f"ray.num_workers = {r.num_workers} workers need {', '.join(short)}; lower ray.num_workers or the "
            "per-worker resources, or set ray.autoscaling = true on an autoscaling cluster")


def resolve_model_path(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``model.name_or_path`` decided once, on the driver: a local folder made
    absolute (the workers run elsewhere), a hub id the hub cannot serve replaced by its offline
    rebuild (:func:`clp_ray.model.source.resolve_source`); ``tiny`` stays symbolic (every worker
    builds the same seeded model)."""
    if cfg.model.name_or_path == "tiny":
        return cfg
    try:
        ref = resolve_source(cfg.model.name_or_path)
    except ClpRayError as e:
        raise ConfigError(f"{cfg.cite('model.name_or_path')}: {e}") from None
    if ref == cfg.model.name_or_path:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": ref})})


def model_settings(cfg: ExperimentConfig, source: Optional[str] = None) -> ResolvedSettings:
    """How the config's model embeds, read on the driver from the same folder files the workers
    read, to log and record before training. ``source``: the model's resolved source, if known."""
    source = source or resolve_source(cfg.model.name_or_path, cfg.model.tiny)
    return resolve(settings_folder(source), cfg.model.explicit_settings())


def check_positions(cfg: ExperimentConfig, resolved: ResolvedSettings, source: str) -> None:
    """The max lengths against the model's position embeddings (``source``: where it loads from),
    before Ray starts (a hub model whose config cannot be read here is left to the workers' load,
    which checks it too)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        log.debug("max lengths not checked before starting: %s", e)
        return
    try:
        check_max_lengths(resolved.settings, resolved.sources, config, cfg.model.name_or_path, cfg.cite)
    except ClpRayError as e:
        raise ConfigError(str(e)) from None


def check_moe_layers(cfg: ExperimentConfig, num_layers: Optional[int] = None) -> None:
    """``moe.layers`` against the model's layer count, on the driver: the workers would otherwise
    find a bad index only after Ray and DeepSpeed have started (a minute on the local profile).

    ``num_layers=None`` reads it from the model's config; if that fails here (e.g. a driver without
    the hub cache) the check is left to the workers, which load the model anyway.
    """
    if not cfg.moe.enabled or is_moe_folder(cfg.model.name_or_path):
        return
    if num_layers is None:
        try:
            num_layers = num_encoder_layers(cfg.model)
        except ClpRayError as e:
            log.warning("moe.layers not checked before starting: %s", e)
            return
    try:
        normalize_layer_indices(cfg.moe.layers, num_layers)
    except ValueError as e:
        raise ConfigError(f"{cfg.cite('moe.layers')}: {e}; {cfg.cite('model.name_or_path')}") from None


def check_consistency(cfg: ExperimentConfig) -> None:
    if not cfg.moe.enabled and cfg.moe.train_only == "moe":
        raise ConfigError(f"{cfg.cite('moe.train_only')} trains only MoE layers, but "
                          f"{cfg.cite('moe.enabled')}; use moe.train_only = site, ffn or all")
    if needs_hard_negatives(cfg.loss.lam, cfg.data.train_group_size):
        raise ConfigError(f"{cfg.cite('loss.lam')} needs hard negatives, but "
                          f"{cfg.cite('data.train_group_size')}: it must be >= 2 (or loss.lam = 0)")


def check_heads(cfg: ExperimentConfig) -> None:
    """``eval.mode`` sparse/colbert/hybrid needs BGE-M3's heads: in the model folder (``tiny``: its
    ``m3_heads`` setting), or made by ``model.m3_heads = unified``. A hub id is left to the workers."""
    if cfg.eval.mode == "dense" or cfg.model.m3_heads == "unified":
        return
    ref = cfg.model.name_or_path
    if ref == "tiny":
        has = cfg.model.tiny.m3_heads
    elif Path(ref).is_dir():
        has = all((Path(ref) / f).is_file() for f in HEAD_FILES)
    else:
        return
    if not has:
        raise ConfigError(f"{cfg.cite('eval.mode')} needs BGE-M3's sparse and ColBERT heads ({', '.join(HEAD_FILES)}), "
                          f"which {cfg.cite('model.name_or_path')} does not have; use eval.mode = dense, a model with "
                          "the heads, or model.m3_heads = unified (trains new ones)")


def _validated_data(cfg: ExperimentConfig, require_neg_q: bool):
    """The data's validation report (rejects beside the runs of this config, under ``skip``)."""
    d = cfg.data
    rejects = Path(cfg.train.output_dir).resolve() / f"rejects-{cfg.lang}-{cfg.config_hash()}.jsonl"
    report = validate(d.train_paths, require_neg_q=require_neg_q, group_size=d.train_group_size, max_line_bytes=d.max_line_bytes,
                      on_bad_record=d.on_bad_record, rejects_path=rejects if d.on_bad_record == "skip" else None,
                      on_duplicate=d.on_duplicate)
    log.info("training data: %d good records (%d rejected), content hash %s", report.good, report.bad, report.content_hash)
    return report


def prepare(cfg: ExperimentConfig, *, name: Optional[Callable[[ExperimentConfig, str], str]] = None) -> PreparedRun:
    """All checks that can fail on user input, before any cluster work. ``name(cfg, data hash)``
    names the run (default :func:`run_name`)."""
    check_data_language(cfg)
    check_consistency(cfg)
    check_heads(cfg)
    ds_config = deepspeed_config(cfg, cfg.ray.num_workers)
    check_writable(cfg.train.output_dir, cfg.cite("train.output_dir"), folder=True)
    check_storage(cfg)
    check_tracking(cfg)
    require_neg_q = LossSettings.from_config(cfg).require_neg_q
    report = _validated_data(cfg, require_neg_q)
    data = DataRef(tuple(report.files), report.content_hash, cfg.data.on_duplicate)
    # Build the Arrow cache once on the driver; workers on this machine reuse it.
    records = load_records(data, require_neg_q=require_neg_q, group_size=cfg.data.train_group_size,
                           max_line_bytes=cfg.data.max_line_bytes)
    source = resolve_dev_source(cfg)
    train_ds, heldout = training_split(records, cfg, source)
    if len(train_ds) < cfg.ray.num_workers:
        raise ClpRayError(f"only {len(train_ds)} training records (after the dev split) for {cfg.ray.num_workers} workers")
    dev = build_dev_set(cfg, train_ds, heldout, source)
    source = resolve_source(cfg.model.name_or_path, cfg.model.tiny)  # once, for the settings and positions
    resolved = model_settings(cfg, source)
    check_positions(cfg, resolved, source)
    log.info("model %s embeds with %s", cfg.model.name_or_path, resolved.describe())
    return PreparedRun(cfg, (name or run_name)(cfg, report.content_hash), storage_path(cfg), ds_config, data,
                       report.to_dict(), len(train_ds), {"settings": resolved.settings.to_dict(), "sources": resolved.sources},
                       dev, prefix_cache=prefix_cache_dir(cfg))


def run_lock(cfg: ExperimentConfig, name: str):
    """One process per run (or sweep) folder: two identical commands would otherwise write the
    same checkpoints and MLflow run at once."""
    return exclusive(Path(cfg.train.output_dir).resolve() / name / ".lock", f"run {name}")
