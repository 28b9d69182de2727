"""The DeepSpeed config of a run: ``configs/deepspeed/zero<stage>.json`` with its ``auto`` values
filled from the experiment config (micro batch, accumulation, global batch, clipping, bf16/fp16),
``deepspeed.overrides`` merged over it; a value left ``auto`` or a duplicate key is an error."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from clp_ray.config import ExperimentConfig, default_config_dir
from clp_ray.errors import ConfigError


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
