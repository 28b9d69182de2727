"""How a model embeds — pooling, normalisation, max lengths, query/passage prefixes — resolved in
one documented order, for every entry point (training workers, evaluation, mining, the pyfunc,
Ray Data actors).

Order, per setting (the first that says wins):

1. **explicit**: a config value the user set for this model: ``--set model.pooling=mean``, or a
   config file that names the model itself (``model.name_or_path``) or comes after the one that
   does. Values in ``configs/base.yaml`` or a profile describe *that file's* model: they do not
   apply to a model named later (``--set model.name_or_path=DIR``, ``--model DIR``); see
   :func:`clp_ray.config.build_config`.
2. **the folder**: ``clp_ray.json`` (written by clp-ray), else sentence-transformers' own files —
   ``modules.json`` (a ``Normalize`` module means normalised embeddings), the Pooling module's
   ``config.json`` (``cls`` or ``mean``), ``sentence_bert_config.json`` (``query_length`` and
   ``document_length``, else ``max_seq_length`` for queries and passages alike) and ``config_sentence_transformers.json`` (prompts ``query`` and
   ``passage``/``document``, used as prefixes).
3. **defaults**: CLS pooling, normalised, 64 query / 256 passage tokens, no prefixes.

A sentence-transformers folder that needs something clp-ray's Embedder does not do (a Dense
layer, max pooling, lower-casing) is refused with the reason rather than embedded differently.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clp_ray.errors import ClpRayError

log = logging.getLogger(__name__)

META_FILE = "clp_ray.json"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
KINDS = ("query", "passage")


@dataclass(frozen=True)
class EmbedSettings:
    """The settings that decide what vector a text gets (saved with every model clp-ray writes)."""

    pooling: str = "cls"
    normalize: bool = True
    query_max_len: int = 64
    passage_max_len: int = 256
    query_prefix: str = ""
    passage_prefix: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def prefix(self, kind: Optional[str]) -> str:
        return {"query": self.query_prefix, "passage": self.passage_prefix}.get(kind or "", "")

    def max_len(self, kind: Optional[str]) -> int:
        return self.query_max_len if kind == "query" else self.passage_max_len


SETTING_KEYS = tuple(f.name for f in fields(EmbedSettings))


@dataclass
class ResolvedSettings:
    settings: EmbedSettings
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where its value came from

    def describe(self) -> str:
        return ", ".join(f"{k}={getattr(self.settings, k)!r} ({self.sources.get(k, 'defaults')})" for k in SETTING_KEYS)


def resolve(folder: Optional[str | os.PathLike], explicit: Optional[Mapping[str, Any]] = None) -> ResolvedSettings:
    """Resolve every setting for the model in ``folder`` (a local folder; None: nothing to read)."""
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
    unknown = set(explicit) - set(SETTING_KEYS)
    if unknown:
        raise ValueError(f"unknown embedding settings {sorted(unknown)} (known: {', '.join(SETTING_KEYS)})")
    from_folder = folder_settings(folder) if folder is not None else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in SETTING_KEYS:
        if key in explicit:
            values[key], sources[key] = explicit[key], "explicit"
        elif key in from_folder:
            values[key], sources[key] = from_folder[key]
    settings = EmbedSettings(**values)
    if settings.pooling not in ("cls", "mean"):
        raise ClpRayError(f"pooling must be 'cls' or 'mean', got {settings.pooling!r} ({sources.get('pooling')})")
    return ResolvedSettings(settings, sources)


def folder_settings(folder: str | os.PathLike) -> dict[str, tuple[Any, str]]:
    """``{setting: (value, source file)}`` for what a local model folder says about itself."""
    root = Path(folder)
    out = _sentence_transformers_settings(root)
    meta = read_meta(root)
    out.update({k: (meta[k], META_FILE) for k in SETTING_KEYS if meta.get(k) is not None})
    return out


class ModelMeta(BaseModel):
    """What ``clp_ray.json`` may hold: the embedding settings, the MoE layout, ONNX's I/O names and
    the bundled samples' language; unknown keys and wrong types are refused (a typo'd setting would
    otherwise be ignored and the model embed differently)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Optional[int] = Field(None, ge=1)
    pooling: Optional[Literal["cls", "mean"]] = None
    normalize: Optional[bool] = None
    query_max_len: Optional[int] = Field(None, ge=1)
    passage_max_len: Optional[int] = Field(None, ge=1)
    query_prefix: Optional[str] = None
    passage_prefix: Optional[str] = None
    moe: Optional[dict[str, Any]] = None
    onnx: Optional[dict[str, Any]] = None


def read_meta(folder: str | os.PathLike) -> dict:
    """A folder's ``clp_ray.json`` ({} when it has none), validated (:class:`ModelMeta`)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ClpRayError(f"{path}: must be a JSON object of model settings, got {type(data).__name__}")
    try:
        ModelMeta.model_validate(data)
    except ValidationError as e:
        raise ClpRayError(f"{path}: invalid model settings: " + "; ".join(_meta_error(err) for err in e.errors())) from None
    return data


def _meta_error(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(ModelMeta.model_fields), n=1, cutoff=0.6)
        return f"{key}: unknown key" + (f" (did you mean {close[0]}?)" if close else
                                        f"; known keys: {', '.join(ModelMeta.model_fields)}")
    return f"{key}: {err['msg']} (got {err.get('input')!r:.80})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ClpRayError(f"{path}: cannot read model settings: {e}") from None


def _sentence_transformers_settings(root: Path) -> dict[str, tuple[Any, str]]:
    if not (root / "modules.json").is_file():
        return {}
    out: dict[str, tuple[Any, str]] = {}
    modules = _read_json(root / "modules.json")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = [k for k in kinds if k not in ("Transformer", "MoETransformer", "Pooling", "Normalize")]
    if unsupported:
        raise ClpRayError(f"{root / 'modules.json'}: sentence-transformers module(s) {', '.join(unsupported)} are not "
                          "supported by clp-ray's Embedder (Transformer, Pooling and Normalize are)")
    out["normalize"] = ("Normalize" in kinds, "modules.json")
    for m, kind in zip(modules, kinds):
        if kind == "Pooling":
            pooling_file = root / m.get("path", "1_Pooling") / "config.json"
            if pooling_file.is_file():
                out["pooling"] = (_pooling_mode(_read_json(pooling_file), pooling_file), str(pooling_file.relative_to(root)))
    bert_config = root / "sentence_bert_config.json"
    if bert_config.is_file():
        cfg = _read_json(bert_config)
        if cfg.get("do_lower_case"):
            raise ClpRayError(f"{bert_config}: do_lower_case is true; clp-ray's Embedder does not lower-case its input")
        if cfg.get("max_seq_length"):
            out["query_max_len"] = out["passage_max_len"] = (int(cfg["max_seq_length"]), bert_config.name)
        # sentence-transformers 6's per-task lengths (what encode_query / encode_document truncate at)
        for key, name in (("query_max_len", "query_length"), ("passage_max_len", "document_length")):
            if cfg.get(name):
                out[key] = (int(cfg[name]), f"{bert_config.name} {name}")
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = _read_json(st_config).get("prompts") or {}
        for key, names in (("query_prefix", ("query",)), ("passage_prefix", ("passage", "document", "corpus"))):
            name = next((n for n in names if n in prompts), None)
            if name is not None:
                out[key] = (str(prompts[name]), f"{st_config.name} prompts.{name}")
    return out


def _pooling_mode(cfg: dict, path: Path) -> str:
    if cfg.get("include_prompt") is False:
        raise ClpRayError(f"{path}: include_prompt is false (prompt tokens left out of pooling); "
                          "clp-ray's Embedder pools over the whole input")
    mode = cfg.get("pooling_mode")
    if mode is None:  # the older format: one boolean per mode
        legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
        on = [m for k, m in legacy.items() if cfg.get(k)]
        mode = on[0] if len(on) == 1 else (on or ["mean"])  # sentence-transformers' own default is mean
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else "+".join(mode)
    if mode not in ("cls", "mean"):
        raise ClpRayError(f"{path}: pooling mode {mode!r} is not supported by clp-ray's Embedder (cls and mean are)")
    return mode
