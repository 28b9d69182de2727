"""Which registered version a request's pinned ``model`` means (``clp-ray-hi/3``, ``clp-ray-hi@challenger``).

The replica asks MLflow's registry what exists (versions, and where each alias points) and keeps the
answer for ``ttl_s``; a version or alias it has not seen is looked up again at once (it may have been
registered a moment ago) before the request is a 404 that names what exists.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from clp_ray.serving.openai_api import ApiError, ModelRef


@dataclass(frozen=True)
class Registered:
    """One registered model as the registry holds it now."""

    versions: tuple[str, ...]  # ascending
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> version

    def listing(self, name: str) -> str:
        versions = ", ".join(self.versions) or "none"
        aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(self.aliases.items()))
        return f"{name} has versions {versions}" + (f" (aliases {aliases})" if aliases else "")


class RegistryView:
    """Registered versions and aliases per model name, from MLflow, cached for ``ttl_s``."""

    def __init__(self, tracking_uri: str, ttl_s: float):
        self.tracking_uri = tracking_uri
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Registered]] = {}
        self._lock = threading.Lock()

    def registered(self, name: str, fresh: bool = False) -> Registered:
        with self._lock:
            hit = self._cache.get(name)
        if hit and not fresh and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        versions = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
        aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
        entry = Registered(tuple(versions), aliases)
        with self._lock:
            self._cache[name] = (time.monotonic(), entry)
        return entry

    def version_for(self, name: str, ref: ModelRef) -> str:
        """The version ``ref`` pins for the registered model ``name`` (blocking: call it off the event loop)."""
        for fresh in (False, True):
            reg = self.registered(name, fresh)
            if ref.version is not None and ref.version in reg.versions:
                return ref.version
            if ref.alias is not None and ref.alias in reg.aliases:
                return reg.aliases[ref.alias]
        what = f"version {ref.version}" if ref.version is not None else f"alias @{ref.alias}"
        raise ApiError(404, f"{name} has no {what}: {reg.listing(name)}", param="model", code="model_not_found")

    def listing(self, name: str) -> Optional[Registered]:
        """What ``name`` holds, or None when the registry cannot say (for ``GET /v1/models``)."""
        try:
            return self.registered(name)
        except Exception:  # MLflow down: the listing shows the served aliases only
            return None
