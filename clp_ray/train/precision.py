"""Mixed precision on CPUs: ``train.precision: auto`` trains under bf16 autocast on a CPU that
computes bf16 natively (AVX512-BF16 or AMX), fp32 elsewhere.

DeepSpeed's own ``bf16`` mode casts the model's weights to bf16; on a CPU autocast is the better
fit: the weights, gradients and AdamW state stay fp32 (fp32 master weights by construction) and
only the matmuls of the forward (and their backward) run in bf16. The router, the pooling and the
loss stay fp32 (:mod:`clp_ray.model.moe`, :meth:`~clp_ray.model.embedder.Embedder._pool`,
:mod:`clp_ray.loss.objective`). Decided on the worker, whose CPU it is.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from functools import lru_cache
from typing import Optional

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (Linux ``/proc/cpuinfo`` flags; ``CLP_RAY_CPU_BF16=0/1`` decides instead)."""
    forced = os.environ.get("CLP_RAY_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_FLAGS)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 when ``precision`` is ``auto`` on a CPU with native bf16, else None (DeepSpeed's
    config carries the GPU's and the explicit precisions)."""
    if precision == "auto" and device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast(dtype: Optional[torch.dtype], device: torch.device):
    """The forward's autocast context (a no-op for None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def describe(precision: str, dtype: Optional[torch.dtype], ds_config: dict) -> str:
    if dtype is not None:
        return "bf16 autocast on the CPU (fp32 weights and optimizer)"
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled"):
            return f"DeepSpeed {name}"
    return "fp32" + (" (this CPU has no native bf16)" if precision == "auto" else "")
