"""Module paths from before the package split (``clp_ray.modeling``, ``clp_ray.moe``, ...) keep
importing: each resolves to the module that now holds its code, so code written against them, saved
sentence-transformers folders (``modules.json`` names ``clp_ray.st_module.MoETransformer``) and
pickles of registered models (``clp_ray.pyfunc.EmbedderPyfunc``) still load. One table, no shim files.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# old path -> the module(s) its names live in now (first match wins)
MOVED: dict[str, tuple[str, ...]] = {
    "clp_ray.atomic": ("clp_ray.util.atomic",),
    "clp_ray.bounded_yaml": ("clp_ray.util.bounded_yaml",),
    "clp_ray.cache": ("clp_ray.util.cache",),
    "clp_ray.lazy": ("clp_ray.util.lazy",),
    "clp_ray.locks": ("clp_ray.util.locks",),
    "clp_ray.redact": ("clp_ray.util.redact",),
    "clp_ray.storage": ("clp_ray.util.storage",),
    "clp_ray.unicode_text": ("clp_ray.util.unicode_text",),
    "clp_ray.output_guard": ("clp_ray.util.output_guard",),
    "clp_ray.modeling": ("clp_ray.model.embedder",),
    "clp_ray.model_settings": ("clp_ray.model.settings",),
    "clp_ray.model_folder": ("clp_ray.model.folder",),
    "clp_ray.moe": ("clp_ray.model.moe", "clp_ray.loss.router"),
    "clp_ray.moe_spec": ("clp_ray.config.moe_spec",),
    "clp_ray.grouped_linear": ("clp_ray.model.grouped_linear",),
    "clp_ray.m3": ("clp_ray.model.m3",),
    "clp_ray.tiny": ("clp_ray.model.tiny",),
    "clp_ray.offline_e5": ("clp_ray.model.offline_e5",),
    "clp_ray.st_files": ("clp_ray.model.st_files",),
    "clp_ray.st_module": ("clp_ray.model.st_module",),
    "clp_ray.model_refs": ("clp_ray.model.source", "clp_ray.tracking.model_refs"),
    "clp_ray.export": ("clp_ray.model.export",),
    "clp_ray.losses": ("clp_ray.loss.clp",),
    "clp_ray.m3_loss": ("clp_ray.loss.m3",),
    "clp_ray.objective": ("clp_ray.loss.objective",),
    "clp_ray.samples": ("clp_ray.data.samples",),
    "clp_ray.miracl": ("clp_ray.data.miracl",),
    "clp_ray.m3_search": ("clp_ray.evaluation.m3_search",),
    "clp_ray.rank_encode": ("clp_ray.evaluation.rank_encode",),
    "clp_ray.dev_set": ("clp_ray.evaluation.dev_set",),
    "clp_ray.registry": ("clp_ray.tracking.registry",),
    "clp_ray.pyfunc": ("clp_ray.tracking.pyfunc",),
    "clp_ray.serve": ("clp_ray.serving.app",),
    "clp_ray.serve_api": ("clp_ray.serving.openai_api",),
    "clp_ray.plots": ("clp_ray.tune.plots",),
    "clp_ray.search": ("clp_ray.tune",),
    "clp_ray.training": ("clp_ray.train",),
}


class _Forward(types.ModuleType):
    """An old module whose names now live in several modules."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name)
        self._targets = targets

    def __getattr__(self, attr: str):
        for t in self._targets:
            module = importlib.import_module(t)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        targets = MOVED[spec.name]
        return importlib.import_module(targets[0]) if len(targets) == 1 else _Forward(spec.name, targets)

    def exec_module(self, module) -> None:
        pass  # already imported under its new name


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before path finders: a stale old file never shadows the move
