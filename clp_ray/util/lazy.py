"""Package re-exports resolved on first use (PEP 562).

A package's ``__init__`` that imported all its modules eagerly made every process that unpickles
one small payload class (Ray Train's controller unpickling ``train_loop_config``) import torch,
transformers, DeepSpeed, datasets and MLflow first: ~5 s per training run on two cores.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, list[str]]) -> tuple[Callable, Callable, list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` re-exporting ``{module: [names]}``."""
    where = {name: f"{package}.{module}" for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip this hook
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__, sorted(where)
