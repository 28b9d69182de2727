"""What every config section shares: strict fields (no unknown keys, no bool/number coercion), paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from clp_ray.util.paths import ASSETS_DIR, PACKAGE_DIR, resolve_path  # noqa: F401  (re-exported)


def default_config_dir() -> Path:
    """``$CLP_RAY_CONFIG_DIR`` or the repository's ``configs/`` next to the package."""
    return Path(os.environ.get("CLP_RAY_CONFIG_DIR", PACKAGE_DIR.parent / "configs"))


# Seeds feed torch, numpy and Python's random: one range all of them take.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos; assignments are validated too; no
    # infinities or NaN where a number is expected (.inf would pass a `ge=0` bound).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        """No booleans where a number is expected (pydantic would make ``true`` 1) and no numbers
        where a boolean is (``2`` would be True)."""
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and kinds and bool not in kinds:
            raise ValueError(f"expected {' or '.join(k.__name__ for k in kinds)}, not a boolean")
        if kinds == {bool} and not isinstance(value, bool) and isinstance(value, (int, float)):
            raise ValueError("expected true or false, not a number")
        return value


def _scalar_kinds(annotation: Any) -> set[type]:
    """The int/float/bool types an annotation admits (through Optional, Annotated, unions)."""
    if annotation in (int, float, bool):
        return {annotation}
    return {k for arg in get_args(annotation) for k in _scalar_kinds(arg)}
