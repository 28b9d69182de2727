"""Layered loading with provenance.

Resolution order (later wins): ``configs/base.yaml`` -> ``configs/lang/<lang>.yaml`` ->
``configs/profiles/<profile>.yaml`` -> each ``--set dotted.key=value`` in order. Every leaf remembers
the file and line it came from, so a validation error reads
``configs/lang/hi.yaml:4: loss.temperature: Input should be greater than 0 (got -1)``."""

from __future__ import annotations

import copy
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Optional, get_args

import yaml
from pydantic import BaseModel, ValidationError

from clp_ray.config.base import default_config_dir
from clp_ray.config.experiment import ExperimentConfig
from clp_ray.config.sections import MODEL_SETTINGS
from clp_ray.errors import ConfigError
from clp_ray.util import bounded_yaml

log = logging.getLogger(__name__)


class _Layer:
    """One source of settings: its data and, per dotted key, where that key was written.
    ``user_set``: a ``--set`` (or ``--model``) on the command line rather than a config file."""

    def __init__(self, data: dict[str, Any], where: dict[str, str], user_set: bool = False):
        self.data = data
        self.where = where
        self.user_set = user_set


def _node_lines(node: yaml.Node, path: str, source: str, where: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = f"{source}:{key_node.start_mark.line + 1}"
            if key in where:  # YAML loaders keep the last one: a whole section would vanish silently
                raise ConfigError(f"{line}: {key}: duplicate key (first set at {where[key]})")
            where[key] = line
            _node_lines(value_node, key, source, where)


def load_yaml_layer(path: Path) -> _Layer:
    shown = _display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read config file: {e.strerror or e}") from None
    try:
        data, node = bounded_yaml.compose_and_load(text)
    except bounded_yaml.YAMLBombError as e:
        raise ConfigError(f"{shown}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{shown}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits
        raise ConfigError(f"{shown}: unusable value: {_first_line(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}:1: top level must be a mapping of sections, got {type(data).__name__}")
    where: dict[str, str] = {}
    if node is not None:
        _node_lines(node, "", shown, where)
    return _Layer(data, where)


def parse_set(assignment: str) -> _Layer:
    """``train.learning_rate=3e-5`` -> a layer; the value is parsed as a YAML scalar/flow value."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    try:
        value = bounded_yaml.safe_load(raw) if raw.strip() else ""
    except bounded_yaml.YAMLBombError as e:
        raise ConfigError(f"--set {_shorten(assignment)!r}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {_shorten(assignment)!r}: value is not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits
        raise ConfigError(f"--set {_shorten(assignment)!r}: unusable value: {_first_line(e)}") from None
    data: dict[str, Any] = {}
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    where = {".".join(parts[: i + 1]): f"--set {_shorten(assignment)}" for i in range(len(parts))}
    return _Layer(data, where, user_set=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"<{type(value).__name__} too long to show>"


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _merge(base: dict[str, Any], overlay: dict[str, Any], where: dict[str, str], overlay_where: dict[str, str], prefix: str = "") -> None:
    for key, value in overlay.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, where, overlay_where, path)
        else:
            base[key] = copy.deepcopy(value)
            # Forget provenance of keys the overlay replaced wholesale.
            for k in [k for k in where if k.startswith(path + ".")]:
                del where[k]
            for k, v in overlay_where.items():
                if k == path or k.startswith(path + "."):
                    where[k] = v
        if path in overlay_where:
            where[path] = overlay_where[path]


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def known_languages(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((config_dir or default_config_dir()) / "lang").glob("*.yaml"))


def known_profiles(config_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((config_dir or default_config_dir()) / "profiles").glob("*.yaml"))


def _format_error(err: dict[str, Any], where: dict[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc) or "<root>"
    source = None
    for n in range(len(loc), 0, -1):  # longest prefix that some layer wrote
        source = where.get(".".join(loc[:n]))
        if source:
            break
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _key_hint(err["loc"])
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {_shorten(_safe_repr(err['input']))})"
    return f"{source or 'defaults'}: {dotted}: {msg}"


def _key_hint(loc: tuple) -> str:
    """`` (did you mean X?)`` for a near miss, else the section's valid keys; '' if unknown."""
    section: Any = ExperimentConfig
    for part in loc[:-1]:  # walk down to the section that holds the unknown key
        field = section.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return ""
        candidates = [field.annotation, *get_args(field.annotation)]  # Optional[Section] too
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if section is None:
            return ""
    keys = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f"; valid keys here: {', '.join(keys)}"


def _stale_model_settings(layers: list[_Layer]) -> list[str]:
    """The ``model.*`` settings (pooling, max lengths, prefixes, ...) whose last writer is a config
    file that comes before the layer naming the model: they describe that file's model (BGE-M3 in
    base.yaml, the profile's model), not the one named later (``--set model.name_or_path=DIR``,
    ``--model DIR``), so that model's own folder decides them. ``--set`` values always apply."""
    def model_part(layer: _Layer) -> dict:
        part = layer.data.get("model")
        return part if isinstance(part, dict) else {}

    named_at = max((i for i, layer in enumerate(layers) if "name_or_path" in model_part(layer)), default=-1)
    stale = []
    for key in MODEL_SETTINGS:
        last = max((i for i, layer in enumerate(layers) if key in model_part(layer)), default=None)
        if last is not None and last < named_at and not layers[last].user_set:
            stale.append(key)
    return stale


def build_config(layers: list[_Layer]) -> ExperimentConfig:
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    for layer in layers:
        _merge(data, layer.data, where, layer.where)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    for key in _stale_model_settings(layers):
        value, origin = model.pop(key, None), where.pop(f"model.{key}", "?")
        log.info("model.%s = %r (%s) describes another model than model.name_or_path = %s (%s): left to that "
                 "model's own folder", key, value, origin, model.get("name_or_path"), where.get("model.name_or_path"))
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        lines = [_format_error(err, where) for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    cfg._where = where
    return cfg


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any], origin: str) -> ExperimentConfig:
    """``cfg`` with ``overrides`` (``{"loss.lam": 0.0}`` or nested mappings) applied and validated
    as a ``--set`` would be; errors name ``origin`` and the key path."""
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(f"{origin}: {key!r}: expected a dotted key")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: {key}: conflicts with another override of {part}")
        node[parts[-1]] = value
        where.update({".".join(parts[: i + 1]): origin for i in range(len(parts))})
    return build_config([_Layer(cfg.to_dict(), dict(cfg._where or {})), _Layer(data, where, user_set=True)])


def _unknown(kind: str, name: str, folder: Path, known: list[str]) -> ConfigError:
    where = f"not a file in {_display_path(folder)}" if "/" in name or "\\" in name else f"no {_display_path(folder / f'{name}.yaml')}"
    return ConfigError(f"unknown {kind} {name!r}: {where}; known {kind}s: {', '.join(known) or '(none)'}")


def load_config(
    lang: str | None = None,
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_dir: str | os.PathLike | None = None,
    extra_files: list[str | os.PathLike] | tuple = (),
    model: Optional[str] = None,
) -> ExperimentConfig:
    """Resolve base -> lang -> profile -> extra files -> ``--set`` overrides into a validated config.

    ``model``: a model named on the command line (``--model REF``) as the last layer; the model
    settings written for the config's own model then no longer apply (:func:`_stale_model_settings`).
    """
    cdir = Path(config_dir) if config_dir else default_config_dir()
    base = cdir / "base.yaml"
    if not base.exists():
        raise ConfigError(f"{_display_path(base)}: base config not found (config dir {cdir})")
    layers = [load_yaml_layer(base)]
    if lang is not None:
        # Only a file in lang/ itself: "../profiles/local" would exist, and the language names runs,
        # output folders and MLflow experiments.
        if lang not in known_languages(cdir):
            raise _unknown("language", lang, cdir / "lang", known_languages(cdir))
        layers.append(load_yaml_layer(cdir / "lang" / f"{lang}.yaml"))
        layers.append(_Layer({"lang": lang}, {"lang": f"--lang {lang}"}))
    if profile is not None:
        if profile not in known_profiles(cdir):
            raise _unknown("profile", profile, cdir / "profiles", known_profiles(cdir))
        layers.append(load_yaml_layer(cdir / "profiles" / f"{profile}.yaml"))
    layers.extend(load_yaml_layer(Path(f)) for f in extra_files)
    _check_set_conflicts(overrides)
    layers.extend(parse_set(s) for s in overrides)
    if model is not None:
        layers.append(_Layer({"model": {"name_or_path": model}}, {"model.name_or_path": f"--model {model}"}, user_set=True))
    return build_config(layers)


def _check_set_conflicts(overrides) -> None:
    """``--set ray=5 --set ray.num_workers=2``: one replaces the other whole; name both."""
    keys = [(s.partition("=")[0].strip(), s) for s in overrides]
    for i, (a, sa) in enumerate(keys):
        for b, sb in keys[i + 1:]:
            if a != b and (b.startswith(a + ".") or a.startswith(b + ".")):
                raise ConfigError(f"--set {_shorten(sa)!r} and --set {_shorten(sb)!r} conflict: one sets a key inside "
                                  "the other, so the later would silently replace the earlier; keep one")
