"""The package layout: layers that only import downwards, no import cycle, small modules, and the
old module paths still importing (clp_ray/_moved.py)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import import_graph  # noqa: E402

# Bottom up; a package imports only packages of a lower rank.
RANK = {"errors": 0, "util": 1, "config": 2, "cluster": 2, "model": 3, "cli": 3, "data": 4, "loss": 5,
        "evaluation": 5, "tracking": 6, "mining": 7, "train": 7, "serving": 7, "tune": 8, "ablation": 9}


def test_packages_import_only_downwards_and_no_module_cycle():
    edges = import_graph.package_edges()
    up = [(a, b) for a, bs in edges.items() if a not in ("clp_ray", "_moved") for b in bs
          if RANK[b] >= RANK[a]]
    assert up == [], f"imports that do not go down a layer: {up}"
    assert set(edges) - {"clp_ray", "_moved"} <= set(RANK)
    assert import_graph.cycles(import_graph.module_edges()) == []
    # The checker sees real edges: the trainer imports the loss, the loss the model.
    assert {"loss", "model", "tracking"} <= edges["train"] and "model" in edges["loss"]


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_dozen_top_level_modules_and_none_over_450_lines():
    top = sorted(p.name for p in (ROOT / "clp_ray").glob("*.py"))
    assert len(top) <= 12, top
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "clp_ray").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_the_graph_script_exits_0_and_prints_the_layers():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "module cycles: none" in p.stdout and "train -> " in p.stdout


@pytest.mark.parametrize("old", sorted(importlib.import_module("clp_ray._moved").MOVED))
def test_old_module_paths_resolve_to_the_moved_code(old):
    from clp_ray._moved import MOVED

    module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old][0])
    if len(MOVED[old]) == 1:
        assert module is new
    public = [n for n in vars(new) if not n.startswith("_") and getattr(getattr(new, n), "__module__", None) == new.__name__]
    assert all(getattr(module, n) is getattr(new, n) for n in public)


def test_moved_names_the_readme_and_saved_artifacts_use():
    import clp_ray
    from clp_ray.loss.clp import clp_loss
    from clp_ray.loss.router import router_loss
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.st_module import MoETransformer
    from clp_ray.tracking.pyfunc import EmbedderPyfunc

    assert (clp_ray.Embedder, clp_ray.clp_loss) == (Embedder, clp_loss)
    assert importlib.import_module("clp_ray.moe").router_loss is router_loss  # now in loss.router
    # modules.json of sentence-transformers folders saved before the move names this path.
    assert importlib.import_module("clp_ray.st_module").MoETransformer is MoETransformer
    assert importlib.import_module("clp_ray.pyfunc").EmbedderPyfunc is EmbedderPyfunc
    assert importlib.import_module("clp_ray.tracking").EmbedderPyfunc is EmbedderPyfunc
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("clp_ray.no_such_module")


def _closure(module: str) -> set[str]:
    edges, seen, todo = import_graph.module_edges(), set(), [module]
    while todo:
        for m in edges.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_training_workers_load_the_model_without_the_registry():
    """The driver resolves the model source once (the payload carries it); a worker's imports
    reach no registry or pyfunc code."""
    reached = _closure("clp_ray.train.worker")
    assert {"clp_ray.model.source", "clp_ray.loss.objective", "clp_ray.loss.settings"} <= reached
    assert not reached & {"clp_ray.tracking.registry", "clp_ray.tracking.pyfunc", "clp_ray.tracking.model_refs"}


def test_the_config_lists_the_embed_settings_fields_in_their_order():
    """config sits below model, so it names the six settings itself: held equal here."""
    from clp_ray.config import MODEL_SETTINGS
    from clp_ray.model.settings import SETTING_KEYS

    assert MODEL_SETTINGS == SETTING_KEYS
