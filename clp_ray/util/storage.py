"""Folders on the run storage (``train.storage_path``): a local folder, or a URI such as
``s3://bucket/ray_results`` (the cluster profile), ``gs://…`` or ``file://…``.

Ray reports checkpoint paths *inside* the storage's filesystem (``bucket/ray_results/…`` for S3,
no scheme), so a checkpoint's model folder is neither a local path the driver can open nor a URI
another process can. :func:`location` turns it back into a URI on the same storage (its query
options, e.g. ``?endpoint_override=…`` for MinIO, kept), and :func:`local_folder` gives the driver a
local copy of it for evaluation and for the MLflow registry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def location(storage: str, fs_path: str) -> str:
    """``fs_path`` (a path in ``storage``'s filesystem, as Ray reports it) as a local path or URI on
    the same storage: its credentials (``s3://KEY:SECRET@bucket``) and query options kept."""
    if not is_uri(storage):
        return fs_path
    scheme, rest = storage.split("://", 1)
    query = rest.split("?", 1)[1] if "?" in rest else ""
    netloc = rest.split("?", 1)[0].split("/", 1)[0]
    userinfo = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
    path = fs_path if scheme == "file" else fs_path.lstrip("/")
    return f"{scheme}://{userinfo}{path}" + (f"?{query}" if query else "")


def join(loc: str, name: str) -> str:
    """``loc/name``, before any ``?query`` of a URI."""
    base, sep, query = loc.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def filesystem(loc: str):
    """(pyarrow filesystem, path in it) of a local path or URI."""

    return pafs.FileSystem.from_uri(loc) if is_uri(loc) else (pafs.LocalFileSystem(), os.path.abspath(loc))


def folder_exists(loc: str) -> bool:

    fs, path = filesystem(loc)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def local_folder(loc: str, cache_dir: str | os.PathLike) -> Path:
    """``loc`` itself when it is local; else a copy under ``cache_dir``, downloaded once (a
    checkpoint never changes under its path) and atomically (temp folder + rename)."""

    if not is_uri(loc):
        return Path(loc)
    dest = Path(cache_dir) / f"{Path(loc.split('?', 1)[0]).name}-{hashlib.sha1(loc.encode()).hexdigest()[:10]}"
    if dest.is_dir():
        return dest
    fs, path = filesystem(loc)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))  # one per copier
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.rename(tmp, dest)
        except OSError:  # another process copied the same checkpoint first: use its copy
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def move_aside(loc: str, new_name: str) -> Optional[str]:
    """Rename the folder ``loc`` to ``new_name`` in the same parent; returns its new location, or
    None when nothing is there."""

    fs, path = filesystem(loc)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    dest = f"{path.rstrip('/').rsplit('/', 1)[0]}/{new_name}"
    try:
        fs.move(path, dest)
    except (OSError, NotImplementedError):  # object stores cannot rename a folder: copy, then delete
        pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(path)
    return location(loc, dest)
