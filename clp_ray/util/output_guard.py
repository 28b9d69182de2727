"""One guard for every job's outputs: an output never replaces an input, and a folder output never
replaces a folder of someone else's files.

- an output that resolves to an input (``--run-file`` = the qrels, ``--rejects`` = the data file)
  is refused;
- an output inside an input folder where a file already is (it would replace one of its files),
  or a folder output that contains an input (replacing it would delete the input), is refused;
- a folder output that exists, is not empty and was not written by the same job (a marker file
  says which job wrote it) is replaced only with ``--overwrite``.

Every refusal is a :class:`~clp_ray.errors.ConfigError` (exit 2) naming both paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional

from clp_ray.errors import ConfigError

MARKER = ".clp_ray_output.json"

PathLike = str | os.PathLike


def _resolved(path: PathLike) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def _is_local(path: Optional[PathLike]) -> bool:
    return path is not None and str(path) != "" and "://" not in str(path)


def check_outputs(
    outputs: Mapping[str, Optional[PathLike]],
    inputs: Mapping[str, Optional[PathLike]],
    *,
    folders: Iterable[str] = (),
    job: str = "",
    overwrite: bool = False,
) -> None:
    """Refuse (ConfigError) outputs that would overwrite inputs; ``outputs``/``inputs`` map what
    names each path (``--out``, ``--corpus``) to it (None/remote entries are skipped); ``folders``
    names the outputs that are folders, replaced whole, which ``job`` may replace only when it
    wrote them (or with ``overwrite``)."""
    ins = {what: _resolved(p) for what, p in inputs.items() if _is_local(p)}
    outs = {what: _resolved(p) for what, p in outputs.items() if _is_local(p)}
    folders = set(folders)
    for what, out in outs.items():
        for in_what, src in ins.items():
            _check_pair(what, out, in_what, src, what in folders)
        if what in folders:
            _check_folder(what, out, job, overwrite)
    seen: dict[Path, str] = {}
    for what, out in outs.items():
        if out in seen:
            raise ConfigError(f"{what} and {seen[out]} are the same path ({out}): one would overwrite the other")
        seen[out] = what


def _check_pair(what: str, out: Path, in_what: str, src: Path, folder: bool) -> None:
    if out == src:
        raise ConfigError(f"{what} {out} is the input {in_what}: writing it would destroy the input")
    if folder and src.is_relative_to(out):
        raise ConfigError(f"{what} {out} contains the input {in_what} ({src}): replacing it would delete the input")
    if src.is_dir() and out.is_relative_to(src) and out.exists():
        raise ConfigError(f"{what} {out} is inside the input {in_what} ({src}) and exists: "
                          "it would replace one of the input's files; write somewhere else")


def _check_folder(what: str, out: Path, job: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} is a file, not a folder")
    if not out.is_dir() or overwrite or not any(out.iterdir()):
        return
    wrote = written_by(out)
    if wrote != job:
        by = f"written by {wrote}" if wrote else "not written by clp-ray"
        raise ConfigError(f"{what} {out} is a non-empty folder {by}: it would be deleted and replaced; "
                          "pass --overwrite to replace it, or choose a new folder")


def written_by(folder: PathLike) -> Optional[str]:
    """The job that wrote ``folder`` (its marker), or None."""
    try:
        return str(json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))["job"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_output(folder: PathLike, job: str) -> None:
    """Record in ``folder`` (an output being built, before it is published) which job wrote it."""
    (Path(folder) / MARKER).write_text(json.dumps({"job": job}) + "\n", encoding="utf-8")


def beir_inputs(data_dir: Optional[PathLike], split: str, what: str = "--data") -> dict[str, Path]:
    """The files a BEIR-layout folder's split is read from, named for messages (none for miracl://)."""
    if not _is_local(data_dir):
        return {}
    from clp_ray.util.paths import resolve_path

    root = Path(resolve_path(str(data_dir)))
    return {f"{what} corpus": root / "corpus.jsonl", f"{what} queries": root / "queries.jsonl",
            f"{what} qrels": root / "qrels" / f"{split}.tsv"}


def model_inputs(*refs: Optional[str], what: str = "--model") -> dict[str, Path]:
    """The local model folders among ``refs`` (hub ids, ``tiny`` and ``models:/`` are not paths here)."""
    return {f"{what} {ref}": Path(ref) for ref in refs if ref and _is_local(ref) and Path(ref).is_dir()}
