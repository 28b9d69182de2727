"""One training run: a Ray Train ``TorchTrainer`` whose workers run DeepSpeed ZeRO on the CLP loss.

Driver side (:func:`prepare` + :func:`fit`): validate data and resources before any worker starts,
build the DeepSpeed config from ``configs/deepspeed/zero<stage>.json`` filled from the experiment
config, open the MLflow run, then ``TorchTrainer.fit()``.

Worker side (:func:`train_worker`): Embedder + MoE upcycling + train-only policy, ``deepspeed.initialize``
with a torch AdamW and a warm-up/linear-decay schedule, then per micro-batch the CLP loss plus the
router losses. Every eval period all ranks compute the dev metric (the same function as
``jobs/evaluate.py``), save their DeepSpeed shard, RNG state and data position into one checkpoint
directory and call ``ray.train.report`` together. A restart (``FailureConfig``) or a re-run of the
same command (same ``RunConfig(name, storage_path)``) resumes from the latest checkpoint at the next
micro-batch, so a resumed run takes the same optimizer steps as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from clp_ray.atomic import check_writable
from clp_ray.config import ExperimentConfig, default_config_dir
from clp_ray.errors import ClpRayError, ConfigError
from clp_ray.redact import install_log_filter
from clp_ray.storage import filesystem, folder_exists, is_uri, join, local_folder, location

log = logging.getLogger(__name__)

CKPT_TAG = "ds"
STATE_FILE = "train_state.json"
MODEL_DIR = "model"


# --------------------------------------------------------------------------------------------
# Settings derived from the config.


def resolve_precision(cfg: ExperimentConfig) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if cfg.ray.use_gpu else "fp32"


def _deep_merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json`` keeps the last of two equal keys, which would drop a whole section silently."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def deepspeed_config(cfg: ExperimentConfig, world_size: int) -> dict:
    """The DeepSpeed config: ``zero<stage>.json`` with its ``auto`` values filled from ``cfg``."""
    stage = cfg.deepspeed.stage
    folder = Path(cfg.deepspeed.config_dir) if cfg.deepspeed.config_dir else default_config_dir() / "deepspeed"
    path = folder / f"zero{stage}.json"
    try:
        ds = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.stage = {stage}: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except ValueError as e:  # a duplicate key, or bytes that are not UTF-8
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object (DeepSpeed config), got {type(ds).__name__}")
    ds.pop("_comment", None)
    precision = resolve_precision(cfg)
    t = cfg.train
    fill = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
    }
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = precision == name
    ds.setdefault("zero_optimization", {})["stage"] = stage
    if cfg.deepspeed.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.ray.use_gpu}
        ds["zero_force_ds_cpu_optimizer"] = False  # keep torch AdamW (no JIT-compiled CPU Adam)
    _deep_merge(ds, cfg.deepspeed.overrides)
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ConfigError(f"{path}: values left as 'auto' that clp-ray does not fill: {', '.join(left)}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _walk(v, key)
        else:
            yield key, v


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


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return f


# --------------------------------------------------------------------------------------------
# The module DeepSpeed wraps.


class CLPTrainingModule(nn.Module):
    """Embedder + CLP loss + router losses in one forward (one DeepSpeed engine call per step).

    Inputs are plain padded batches or :class:`~clp_ray.data.Bucketed` ones (length-sorted
    sub-batches, put back in order after encoding). The router loss is the mean over encoder calls.
    """

    def __init__(self, embedder, temperature: float, lam: float, cross_device: bool):
        super().__init__()
        self.embedder = embedder
        self.temperature = temperature
        self.lam = lam
        self.cross_device = cross_device

    def _encode(self, batch, acc: dict) -> torch.Tensor:
        from clp_ray.data import Bucketed
        from clp_ray.moe import router_loss, router_stats

        parts = batch.chunks if isinstance(batch, Bucketed) else [batch]
        outs = []
        for part in parts:
            outs.append(self.embedder(**part))
            acc["router_loss"] = acc["router_loss"] + router_loss(self.embedder.encoder)
            acc["calls"] += 1
            if acc["collect_stats"]:
                for k, v in router_stats(self.embedder.encoder).items():
                    acc["stats"][k] = acc["stats"].get(k, 0.0) + v / len(parts)
        emb = torch.cat(outs) if len(outs) > 1 else outs[0]
        return emb.index_select(0, batch.inverse) if isinstance(batch, Bucketed) else emb

    def forward(self, query, passage, neg_query=None):
        from clp_ray.losses import clp_loss

        acc = {"router_loss": 0.0, "calls": 0, "stats": {}, "collect_stats": False}
        q = self._encode(query, acc)
        acc["collect_stats"] = True  # the passage batch holds most of the tokens
        p = self._encode(passage, acc)
        acc["collect_stats"] = False
        nq = self._encode(neg_query, acc) if neg_query is not None and self.lam > 0 else None
        out = clp_loss(q, p, nq, temperature=self.temperature, lam=self.lam, cross_device=self.cross_device)
        r_loss = acc["router_loss"] / acc["calls"]
        if not torch.is_tensor(r_loss):
            r_loss = out.loss.new_zeros(())
        return out.loss + r_loss, out, r_loss, acc["stats"]


# --------------------------------------------------------------------------------------------
# Worker.


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(batch, device):
    if batch is None or not isinstance(batch, dict):
        return None if batch is None else batch.to(device)
    return {k: v.to(device) for k, v in batch.items()}


def _num_tokens(batch) -> int:
    if batch is None:
        return 0
    return int(batch["attention_mask"].sum()) if isinstance(batch, dict) else batch.num_tokens


def build_engine(module: nn.Module, ds_config: dict, cfg: ExperimentConfig, total_opt: int):
    """The DeepSpeed engine and LR scheduler over ``module``: torch AdamW on the trainable
    parameters only (frozen ones get no optimizer state), linear warm-up then decay over
    ``total_opt`` optimizer steps. Needs an initialised process group (``deepspeed.init_distributed``)."""
    import deepspeed

    from clp_ray.moe import moe_layers, trainable_parameters

    t_cfg = cfg.train
    if ds_config["zero_optimization"]["stage"] == 3:
        # The MoE layer reads its experts' weights itself (clp_ray.grouped_linear) instead of calling
        # the expert modules: ZeRO-3 must gather them whenever the MoE layer runs.
        for _, layer in moe_layers(module):
            for p in layer.experts.parameters():
                deepspeed.zero.register_external_parameter(layer, p)
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=t_cfg.learning_rate, weight_decay=t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_opt, t_cfg.warmup_ratio))
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, scheduler


def train_worker(config: dict) -> None:
    """Ray Train per-worker loop (see the module docstring)."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from clp_ray.data import (
        Collator,
        dev_retrieval_set,
        load_records,
        rank_batches,
        sample_group,
        split_train_dev,
        steps_per_epoch,
    )
    from clp_ray.evaluation import evaluate
    from clp_ray.modeling import load_embedder
    from clp_ray.moe import apply_train_only
    from clp_ray.tracking import Tracker

    cfg = ExperimentConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s", datefmt="%H:%M:%S")
    install_log_filter()
    t_cfg, d_cfg = cfg.train, cfg.data

    # Same seed on every rank: the upcycled routers must start identical.
    torch.manual_seed(t_cfg.seed)
    random.seed(t_cfg.seed)
    embedder = load_embedder(cfg.model, cfg.moe)
    policy = cfg.moe.train_only if cfg.moe.enabled else ("all" if cfg.moe.train_only == "moe" else cfg.moe.train_only)
    trainable, total = apply_train_only(embedder, policy)
    if cfg.model.gradient_checkpointing:
        embedder.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CLPTrainingModule(embedder, cfg.loss.temperature, cfg.loss.lam, cfg.loss.cross_device_negatives)

    records = load_records(_Report(config["data_files"], config["data_hash"], d_cfg.on_duplicate), lam=cfg.loss.lam,
                           group_size=d_cfg.train_group_size, max_line_bytes=d_cfg.max_line_bytes)
    train_ds, dev_ds = split_train_dev(records, d_cfg.dev_fraction, d_cfg.seed, by=d_cfg.dev_split)
    dev_set = dev_retrieval_set(dev_ds) if len(dev_ds) else None
    collate = Collator.for_embedder(embedder, d_cfg.length_bucket_size)  # the model's prefixes and lengths

    micro_per_epoch = steps_per_epoch(len(train_ds), world, t_cfg.per_device_batch_size)
    accum = t_cfg.gradient_accumulation_steps
    total_opt = t_cfg.max_steps or max(1, (t_cfg.epochs * micro_per_epoch) // accum)
    total_micro = total_opt * accum
    opt_per_epoch = max(1, micro_per_epoch // accum)
    eval_every = t_cfg.eval_every_steps or opt_per_epoch

    stage3 = config["ds_config"]["zero_optimization"]["stage"] == 3
    engine, scheduler = build_engine(module, config["ds_config"], cfg, total_opt)

    state = {"micro_step": 0, "global_step": 0, "attempt": 0, "dev_init": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            # Checkpoints hold the trained parameters only: the frozen ones are the model's own,
            # already loaded from the same source (the run name pins the config, hence the source).
            engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            state = json.loads((Path(d) / STATE_FILE).read_text())
            _set_rng_state(torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=False))
    state["attempt"] += 1
    resumed_from = state["global_step"]
    log.info("start: attempt %d at optimizer step %d/%d (%d micro-batches/epoch/rank, %d trainable of %d params)",
             state["attempt"], resumed_from, total_opt, micro_per_epoch, trainable, total)
    tracker = Tracker(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 and config.get("mlflow_run_id") else None

    def run_eval() -> dict[str, float]:
        if dev_set is None:
            return {}
        engine.eval()
        res = evaluate(embedder, dev_set, batch_size=cfg.eval.batch_size, chunk_size=cfg.eval.chunk_size, top_k=cfg.eval.top_k)
        engine.train()
        return {f"dev_{k}": v for k, v in res.metrics.items()}

    if state["dev_init"] is None:
        state["dev_init"] = run_eval()
        if tracker:
            tracker.log_metrics({f"{k}_init": v for k, v in state["dev_init"].items()}, step=0)

    def report_metrics(final: bool, **extra) -> dict[str, Any]:
        return {**run_eval(), "step": state["global_step"], "final": final, "attempt": state["attempt"],
                "resumed_from_step": resumed_from, **extra,
                **{f"{k}_init": v for k, v in (state["dev_init"] or {}).items()}}

    def save_and_report(metrics: dict, final: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="clp-ckpt-") as tmp:
            # Without the frozen parameters (with train_only=moe, 99% of the model: the E5 local
            # profile's checkpoint shrinks from 470 MB to 5 MB, written and copied every eval period).
            engine.save_checkpoint(tmp, tag=CKPT_TAG, exclude_frozen_parameters=True)
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            if rank == 0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            if final:
                _save_final_model(embedder, Path(tmp) / MODEL_DIR, rank, stage3)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    engine.train()
    window = dict.fromkeys(("loss", "contrastive", "penalty", "router_loss", "n", "tokens", "examples"), 0)
    t_window = time.perf_counter()
    batches: list[list[int]] = []
    batches_epoch = -1
    last_metrics: dict[str, Any] = {}
    while state["micro_step"] < total_micro:
        epoch, i = divmod(state["micro_step"], micro_per_epoch)
        if epoch != batches_epoch:
            batches = rank_batches(len(train_ds), rank=rank, world=world, batch_size=t_cfg.per_device_batch_size,
                                   seed=d_cfg.seed, epoch=epoch)
            batches_epoch = epoch
        groups = [sample_group(train_ds[j], d_cfg.train_group_size, seed=d_cfg.seed, epoch=epoch, index=j) for j in batches[i]]
        batch = collate(groups)
        loss, parts, r_loss, stats = engine(_to(batch["query"], device), _to(batch["passage"], device),
                                            _to(batch["neg_query"], device))
        engine.backward(loss)
        engine.step()
        state["micro_step"] += 1
        window["loss"] += float(loss.detach())
        window["contrastive"] += float(parts.contrastive.detach())
        window["penalty"] += float(parts.penalty.detach())
        window["router_loss"] += float(r_loss.detach())
        window["n"] += 1
        window["examples"] += len(groups) * world
        window["tokens"] += sum(_num_tokens(b) for b in (batch["query"], batch["passage"], batch["neg_query"])) * world
        if state["micro_step"] % accum:
            continue
        state["global_step"] += 1
        step = state["global_step"]
        if t_cfg.debug_fail_at_step == step and rank == t_cfg.debug_fail_rank:
            marker = Path(config["run_dir"]) / ".debug_failure_injected"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(step))
                raise RuntimeError(f"debug_fail_at_step: injected failure on rank {rank} at step {step}")
        if tracker and (step % t_cfg.log_every_steps == 0 or step == total_opt):
            dt = max(time.perf_counter() - t_window, 1e-9)
            n = window["n"]
            tracker.log_metrics({
                "train/loss": window["loss"] / n, "train/contrastive": window["contrastive"] / n,
                "train/penalty": window["penalty"] / n, "train/router_loss": window["router_loss"] / n,
                "train/lr": scheduler.get_last_lr()[0], "train/examples_per_s": window["examples"] / dt,
                "train/tokens_per_s": window["tokens"] / dt, **stats,
            }, step=step)
            window = dict.fromkeys(window, 0)
            t_window = time.perf_counter()
        final = state["micro_step"] >= total_micro
        if step % eval_every == 0 or final:
            last_metrics = report_metrics(final, epoch=epoch, train_loss=float(loss.detach()))
            if tracker:
                tracker.log_metrics({k: v for k, v in last_metrics.items() if k.startswith("dev_")}, step=step)
            save_and_report(last_metrics, final)
    if not last_metrics.get("final"):
        # Resumed from a finished run's last checkpoint: nothing left to train; report once so the
        # run has a final checkpoint with the model in it.
        last_metrics = report_metrics(True)
        save_and_report(last_metrics, True)


def _save_final_model(embedder, out: Path, rank: int, stage3: bool) -> None:
    if stage3:
        import deepspeed

        # Every rank must enter: gathering the ZeRO-3 shards is a collective.
        with deepspeed.zero.GatheredParameters(list(embedder.parameters()), modifier_rank=None):
            if rank == 0:
                embedder.save_pretrained(out)
    elif rank == 0:
        embedder.save_pretrained(out)


@dataclass
class _Report:
    """The part of a ValidationReport that workers need to reload the validated data."""

    files: list[str]
    content_hash: str
    on_duplicate: str = "keep"


# --------------------------------------------------------------------------------------------
# Driver.


@dataclass
class PreparedRun:
    cfg: ExperimentConfig
    name: str
    storage: str
    ds_config: dict
    data_files: list[str]
    data_hash: str
    data_report: dict
    extra: dict = field(default_factory=dict)
    # How the model embeds, resolved on the driver: {"settings": {...}, "sources": {...}}.
    model_settings: dict = field(default_factory=dict)

    def settings_params(self) -> dict[str, Any]:
        """The resolved model settings as MLflow params (``model_settings.pooling = mean``, ...)."""
        return {f"model_settings.{k}": v for k, v in self.model_settings.get("settings", {}).items()}

    @property
    def run_dir(self) -> str:
        return join(self.storage, self.name)


RUNTIME_ENV_VARS = {
    "TOKENIZERS_PARALLELISM": "false",
    # Reports wait for the controller's poll; a shorter poll keeps small local runs snappy.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
}


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Connect to the cluster a job was submitted to (``RAY_ADDRESS`` / ``ray.address``), else
    start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    env = dict(RUNTIME_ENV_VARS)
    if not cfg.ray.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for k, v in env.items():
        os.environ.setdefault(k, v)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 runtime_env={"env_vars": env}, log_to_driver=True)


def check_resources(cfg: ExperimentConfig) -> None:
    """Fail before any worker starts when the trial can never be scheduled."""
    import ray

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
    rebuild (:func:`clp_ray.modeling.resolve_source`); ``tiny`` stays symbolic (every worker builds
    the same seeded model)."""
    from clp_ray.modeling import resolve_source

    if cfg.model.name_or_path == "tiny":
        return cfg
    try:
        ref = resolve_source(cfg.model.name_or_path)
    except ClpRayError as e:
        raise ConfigError(f"{cfg.cite('model.name_or_path')}: {e}") from None
    if ref == cfg.model.name_or_path:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": ref})})


def model_settings(cfg: ExperimentConfig):
    """How the config's model embeds (:class:`~clp_ray.model_settings.ResolvedSettings`), read on
    the driver from the same folder files the workers read, to log and record before training."""
    from clp_ray.model_settings import resolve
    from clp_ray.modeling import resolve_source, settings_folder

    return resolve(settings_folder(resolve_source(cfg.model.name_or_path, cfg.model.tiny)), cfg.model.explicit_settings())


def check_moe_layers(cfg: ExperimentConfig, num_layers: Optional[int] = None) -> None:
    """``moe.layers`` against the model's layer count, on the driver: the workers would otherwise
    find a bad index only after Ray and DeepSpeed have started (a minute on the local profile).

    ``num_layers=None`` reads it from the model's config; if that fails here (e.g. a driver without
    the hub cache) the check is left to the workers, which load the model anyway.
    """
    from clp_ray.modeling import is_moe_folder, num_encoder_layers
    from clp_ray.moe import normalize_layer_indices

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


def prepare(cfg: ExperimentConfig, *, name: Optional[Callable[[ExperimentConfig, str], str]] = None) -> PreparedRun:
    """All checks that can fail on user input, before any cluster work: config consistency,
    DeepSpeed config, data validation (rejects written next to the run outputs)."""
    from clp_ray.data import load_records, split_train_dev, validate
    from clp_ray.tracking import check_tracking

    if not cfg.moe.enabled and cfg.moe.train_only == "moe":
        raise ConfigError(f"{cfg.cite('moe.train_only')} trains only MoE layers, but "
                          f"{cfg.cite('moe.enabled')}; use moe.train_only = ffn or all")
    if cfg.data.train_group_size < 2 and cfg.loss.lam > 0:
        raise ConfigError(f"{cfg.cite('loss.lam')} needs hard negatives, but "
                          f"{cfg.cite('data.train_group_size')}: it must be >= 2 (or loss.lam = 0)")
    ds_config = deepspeed_config(cfg, cfg.ray.num_workers)
    check_writable(cfg.train.output_dir, cfg.cite("train.output_dir"), folder=True)
    check_storage(cfg)
    check_tracking(cfg)
    # The run is named after the data too, so its rejects go beside the runs of this config.
    rejects = Path(cfg.train.output_dir).resolve() / f"rejects-{cfg.lang}-{cfg.config_hash()}.jsonl"
    report = validate(cfg.data.train_paths, lam=cfg.loss.lam, group_size=cfg.data.train_group_size,
                      max_line_bytes=cfg.data.max_line_bytes, on_bad_record=cfg.data.on_bad_record,
                      rejects_path=rejects if cfg.data.on_bad_record == "skip" else None,
                      on_duplicate=cfg.data.on_duplicate)
    name = (name or run_name)(cfg, report.content_hash)
    log.info("training data: %d good records (%d rejected), content hash %s", report.good, report.bad, report.content_hash)
    # Build the Arrow cache once on the driver; workers on this machine reuse it.
    records = load_records(report, lam=cfg.loss.lam, group_size=cfg.data.train_group_size, max_line_bytes=cfg.data.max_line_bytes)
    train_ds, _ = split_train_dev(records, cfg.data.dev_fraction, cfg.data.seed, by=cfg.data.dev_split)
    if len(train_ds) < cfg.ray.num_workers:
        raise ClpRayError(f"only {len(train_ds)} training records (after the dev split) for {cfg.ray.num_workers} workers")
    resolved = model_settings(cfg)
    log.info("model %s embeds with %s", cfg.model.name_or_path, resolved.describe())
    return PreparedRun(cfg, name, storage_path(cfg), ds_config, report.files, report.content_hash, report.to_dict(),
                       extra={"train_records": len(train_ds)},
                       model_settings={"settings": resolved.settings.to_dict(), "sources": resolved.sources})


@dataclass
class TrainResult:
    name: str
    run_dir: str
    checkpoint_path: Optional[str]
    model_path: Optional[str]
    metrics: dict[str, Any]
    mlflow_run_id: Optional[str] = None
    local_model_path: Optional[str] = None  # model_path, or its local copy when the storage is remote
    data_files: list[str] = field(default_factory=list)  # the training files read (folders expanded)


def fit(prep: PreparedRun, *, tracker=None, callbacks: Optional[list] = None) -> TrainResult:
    """Run the TorchTrainer for a prepared run; returns where the model is and its dev metrics."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = prep.cfg
    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker, **r.resources_per_worker}
    if r.use_gpu:
        resources["GPU"] = max(r.gpus_per_worker, 1)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg.to_dict(), "ds_config": prep.ds_config, "data_files": prep.data_files, "data_hash": prep.data_hash,
            "run_dir": prep.run_dir, "mlflow_uri": tracker.uri if tracker else None,
            "mlflow_run_id": tracker.run_id if tracker else None,
        },
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=prep.name, storage_path=prep.storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    ckpt = result.checkpoint
    # Locations on the run storage: local paths, or URIs when it is remote (s3://...).
    ckpt_path = location(prep.storage, ckpt.path) if ckpt else None
    model_path = checkpoint_model(ckpt_path) if ckpt_path else None
    return TrainResult(prep.name, prep.run_dir, ckpt_path, model_path, dict(result.metrics or {}),
                       tracker.run_id if tracker else None, data_files=list(prep.data_files))


def checkpoint_model(ckpt_location: str) -> Optional[str]:
    """The model folder in a checkpoint (a location on the run storage, see
    :func:`clp_ray.storage.location`); None when the checkpoint holds no model."""
    model = join(ckpt_location, MODEL_DIR)
    return model if folder_exists(model) else None


def explain_failure(e: BaseException) -> str:
    """The first line of each worker's error, instead of a wall of Ray tracebacks."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        parts = []
        for rank, err in sorted(failures.items()):
            text = str(err).strip().splitlines()
            parts.append(f"rank {rank}: {text[-1] if text else type(err).__name__}")
        return "training failed: " + "; ".join(parts)
    text = str(e).strip().splitlines()
    return f"training failed: {text[-1] if text else type(e).__name__}"


def run_lock(cfg: ExperimentConfig, name: str):
    """One process per run (or sweep) folder: two identical commands would otherwise write the
    same checkpoints and MLflow run at once."""
    from clp_ray.locks import exclusive

    return exclusive(Path(cfg.train.output_dir).resolve() / name / ".lock", f"run {name}")


def open_tracking(prep: PreparedRun):
    """The MLflow run of this training; a re-run of the same run name continues the same MLflow run."""
    from clp_ray.tracking import resume_or_start_run

    cfg = prep.cfg

    def on_start(tracker) -> None:
        tracker.log_params({**cfg.flat(), **prep.settings_params()})
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        tracker.log_text(json.dumps(prep.data_report, indent=2), "data_report.json")
        tracker.log_text(json.dumps(prep.model_settings, indent=2), "model_settings.json")

    return resume_or_start_run(cfg, Path(cfg.train.output_dir).resolve() / prep.name / "mlflow_run_id", prep.name,
                               tags={"clp_ray.data_hash": prep.data_hash, "clp_ray.kind": "train"}, on_start=on_start)


def run_training(cfg: ExperimentConfig) -> TrainResult:
    """jobs/train.py: checks, Ray, MLflow, fit, final artifacts. User errors raise ClpRayError."""
    from ray.train import TrainingFailedError

    cfg = resolve_model_path(cfg)
    check_moe_layers(cfg)
    prep = prepare(cfg)
    with run_lock(cfg, prep.name):  # before any cluster work: a second identical command stops here
        ensure_ray(cfg)
        check_resources(cfg)
        tracker = open_tracking(prep)
        log.info("run %s: storage %s, MLflow run %s (%s)", prep.name, prep.run_dir, tracker.run_id, tracker.uri)
        try:
            result = fit(prep, tracker=tracker)
        except TrainingFailedError as e:
            tracker.end("FAILED")
            raise ClpRayError(explain_failure(e)) from None
        except BaseException:
            tracker.end("KILLED")
            raise
        if result.model_path:
            # On remote storage (s3://...) a local copy under train.output_dir, for MLflow and the user.
            result.local_model_path = str(local_folder(result.model_path, Path(cfg.train.output_dir).resolve() / prep.name))
            tracker.log_artifacts(result.local_model_path, "model")
        tracker.end("FINISHED")
    return result
