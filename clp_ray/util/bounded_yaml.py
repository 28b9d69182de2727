"""YAML loading with alias expansion bounded.

PyYAML builds an aliased node once and shares it, so a "billion laughs" document loads in
microseconds; what explodes is everything that walks the result afterwards (provenance lines,
pydantic, deep copies, JSON dumps). So the composed node graph is measured first — how many nodes
it has with every alias expanded, and whether an alias refers to a node that contains it — and a
document over the bound is refused before anything is constructed from it.
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

# A config or cluster file has a few hundred nodes; a million expanded nodes is far past any real one.
MAX_EXPANDED_NODES = 100_000


class YAMLBombError(ValueError):
    """A document whose aliases expand past the bound, or that contains itself."""


def expanded_size(node: yaml.Node, limit: int = MAX_EXPANDED_NODES) -> int:
    """Nodes in ``node`` with every alias expanded; :class:`YAMLBombError` past ``limit`` or on a cycle."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YAMLBombError("a YAML alias refers to a node that contains it (a recursive document)")
        open_nodes.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise YAMLBombError(f"YAML aliases expand to more than {limit:,} nodes (an alias bomb?)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(node)


def compose_and_load(text: str, limit: int = MAX_EXPANDED_NODES) -> tuple[Any, Optional[yaml.Node]]:
    """(data, node) of one YAML document, refused with :class:`YAMLBombError` past ``limit``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        expanded_size(node, limit)
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def safe_load(text: str, limit: int = MAX_EXPANDED_NODES) -> Any:
    """``yaml.safe_load`` with alias expansion bounded."""
    return compose_and_load(text, limit)[0]
