"""The bundled data samples (``pkg://<name>``) and the language each one is in.

Each sample folder under ``clp_ray/assets`` declares its language in ``sample.json``. A run that
trains or selects a model for ``--lang X`` on a bundled sample of another language would register
``clp-ray-X`` trained and judged on the wrong language, so :func:`check_data_language` refuses it
before any work, naming how to give data of that language instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Optional

from clp_ray.config import ASSETS_DIR, ExperimentConfig
from clp_ray.errors import ConfigError

SAMPLE_FILE = "sample.json"


@dataclass(frozen=True)
class Sample:
    name: str  # the folder under clp_ray/assets: pkg://<name>
    lang: str
    language: str  # the language's name, for messages


@cache
def bundled_samples() -> tuple[Sample, ...]:
    out = []
    for path in sorted(ASSETS_DIR.glob(f"*/{SAMPLE_FILE}")):
        meta = json.loads(path.read_text(encoding="utf-8"))
        out.append(Sample(path.parent.name, meta["lang"], meta.get("language", meta["lang"])))
    return tuple(out)


def sample_of(path: str) -> Optional[Sample]:
    """The bundled sample a ``pkg://<name>[/file]`` path points into; None for any other path."""
    if not str(path).startswith("pkg://"):
        return None
    name = str(path).removeprefix("pkg://").split("/", 1)[0]
    return next((s for s in bundled_samples() if s.name == name), None)


def _how_to_give_data(lang: str) -> str:
    have = ", ".join(f"pkg://{s.name} ({s.lang})" for s in bundled_samples()) or "none"
    return (f"clp-ray bundles no {lang} data (bundled samples: {have}); give {lang} data: "
            f"--set data.train_paths=[FILE.jsonl] (CLP records, e.g. from jobs/mine.py) and "
            f"--set eval.data_dir=DIR (BEIR layout: corpus.jsonl, queries.jsonl, qrels/dev.tsv, qrels/test.tsv), "
            f"or --set eval.data_dir=miracl://{lang} where the Hugging Face hub or a mirror (eval.miracl_root) "
            f"is reachable")


def check_data_language(cfg: ExperimentConfig) -> None:
    """Every bundled sample the run trains or evaluates on is in ``cfg.lang``; else a ConfigError
    naming the key, where it was set and how to give data of that language."""
    used = [("data.train_paths", p) for p in cfg.data.train_paths]
    if cfg.eval.data_dir:
        used.append(("eval.data_dir", cfg.eval.data_dir))
    for key, path in used:
        sample = sample_of(path)
        if sample is not None and sample.lang != cfg.lang:
            raise ConfigError(f"--lang {cfg.lang}: {cfg.cite(key)} is the bundled {sample.language} ({sample.lang}) "
                              f"sample, not {cfg.lang} data: a model registered as {cfg.lang} must be trained and "
                              f"judged on {cfg.lang}. Use --lang {sample.lang} for that sample. {_how_to_give_data(cfg.lang)}")
