"""Where clp-ray keeps what it builds once and reuses: ``$CLP_RAY_CACHE``, default ``~/.cache/clp-ray``.

A module of its own so that the light modules (locks, the run driver) can find the cache without
importing torch and transformers with :mod:`clp_ray.model.tiny`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("CLP_RAY_CACHE", Path.home() / ".cache" / "clp-ray"))
