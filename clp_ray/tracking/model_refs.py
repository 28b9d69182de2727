"""What a user can name as a model with ``--model``: whatever :mod:`clp_ray.model.source` loads
(``tiny``, a local folder, a hub id), or an MLflow registry URI (``models:/<name>@<alias>``,
``models:/<name>/<version>``, ``runs:/...``), resolved to its downloaded folder first.
"""

from __future__ import annotations

from typing import Optional

from clp_ray.config import ModelConfig
from clp_ray.errors import ClpRayError
from clp_ray.model.embedder import Embedder
from clp_ray.model.source import resolve_source
from clp_ray.tracking.registry import registered_model_folder


def load_model_ref(ref: str, model_cfg: Optional[ModelConfig] = None, *, tracking_uri: Optional[str] = None) -> Embedder:
    """Load what a user names with ``--model``: ``tiny``, a local folder (MoE folders included), a
    hub id, or an MLflow registry URI ``models:/<name>@<alias>`` / ``models:/<name>/<version>``,
    with ``model_cfg``'s explicit settings. Failures become one clear :class:`~clp_ray.errors.ClpRayError`."""
    model_cfg = model_cfg or ModelConfig()
    explicit = model_cfg.explicit_settings()
    if ref.startswith(("models:/", "runs:/")):
        ref = registered_model_folder(ref, tracking_uri)
    source = resolve_source(ref, model_cfg.tiny)
    try:
        return Embedder.from_pretrained(source, **explicit)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClpRayError(f"cannot load model {ref!r}: {first}") from None
