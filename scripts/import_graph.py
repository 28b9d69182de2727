"""The import graph of clp_ray, from the source (``ast``; imports inside functions count too).

``python scripts/import_graph.py`` prints each package's imports of other packages and any module
cycle; ``--modules`` prints module-level edges instead. tests/test_layout.py asserts the layering.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "clp_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def module_edges() -> dict[str, set[str]]:
    """module -> the clp_ray modules it imports (``from pkg import name`` resolved to the module
    when ``name`` is one)."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("clp_ray"):
                    r = _resolve(t, known)
                    if r and r != name and r != "clp_ray":
                        edges[name].add(r)
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "clp_ray"


def package_edges() -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, bs in module_edges().items():
        for b in bs:
            if package_of(a) != package_of(b):
                out[package_of(a)].add(package_of(b))
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="module-level edges instead of packages")
    args = ap.parse_args()
    edges = module_edges() if args.modules else package_edges()
    for a in sorted(edges):
        print(f"{a} -> {', '.join(sorted(edges[a]))}")
    found = cycles(module_edges())
    print(f"module cycles: {found or 'none'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
