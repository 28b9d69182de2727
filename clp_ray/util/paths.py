"""Where the package and its bundled assets are, and ``pkg://`` paths into them."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # clp_ray/
ASSETS_DIR = PACKAGE_DIR / "assets"


def resolve_path(path: str | os.PathLike) -> str:
    """Resolve a config path: ``pkg://x`` names the package's bundled assets (so the offline
    profile works from any directory); URLs and other paths are returned as given."""
    p = str(path)
    if p.startswith("pkg://"):
        return str(ASSETS_DIR / p.removeprefix("pkg://"))
    return p
