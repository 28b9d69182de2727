"""Offline checks of a Ray cluster-launcher config (``cluster.yaml``).

Ray's own schema and ``prepare_config`` + ``validate_config`` first, then what they do not catch:
a node type whose ``min_workers`` exceeds its ``max_workers``, security-group rules opening the
dashboard/job API (8265), GCS (6379) or Ray client (10001) ports to the whole internet, a head
that would run training or start without token auth, and a Ray image that is not the pinned
``rayproject/ray:<tested version>`` one.

    python -m clp_ray.cluster cluster.yaml       # exit 0 when the file passes every check
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

PRIVATE_PORTS = {8265: "dashboard / job API", 6379: "GCS", 10001: "Ray client"}
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}


def load(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return data


def check(config: dict[str, Any]) -> list[str]:
    """Every problem found (empty when the config is good)."""
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems: list[str] = []
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema.ValidationError, ValueError: Ray's own verdict
        problems.append(f"ray validation: {str(e).splitlines()[0]}")
    for name, node in (config.get("available_node_types") or {}).items():
        lo, hi = node.get("min_workers", 0), node.get("max_workers")
        if hi is not None and lo > hi:
            problems.append(f"available_node_types.{name}: min_workers {lo} > max_workers {hi}")
    sg = (config.get("provider") or {}).get("security_group") or {}
    for i, rule in enumerate(sg.get("IpPermissions") or []):
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges") or []} | {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or []}
        if not cidrs & OPEN_CIDRS:
            continue
        all_ports = str(rule.get("IpProtocol")) == "-1"
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        for port, what in PRIVATE_PORTS.items():
            if all_ports or lo <= port <= hi:
                problems.append(f"provider.security_group.IpPermissions[{i}]: opens port {port} ({what}) to the internet")
    head_cmds = " ".join(config.get("head_start_ray_commands") or [])
    if "ray start" in head_cmds:
        if not re.search(r"--num-cpus[= ]0\b", head_cmds):
            problems.append("head_start_ray_commands: the head must not run training (ray start --num-cpus=0)")
        if "RAY_AUTH_MODE=token" not in head_cmds:
            problems.append("head_start_ray_commands: Ray token authentication is off (set RAY_AUTH_MODE=token)")
        if "--dashboard-host=0.0.0.0" in head_cmds:
            problems.append("head_start_ray_commands: dashboard bound to 0.0.0.0 (use 127.0.0.1 and `ray dashboard`)")
    image = (config.get("docker") or {}).get("image", "")
    want = f"rayproject/ray:{ray.__version__}-"
    if "ray-ml" in image:
        problems.append(f"docker.image {image}: rayproject/ray-ml images are deprecated and frozen")
    elif image and not image.startswith(want):
        problems.append(f"docker.image {image}: pin {want}<python>-<cuda> (the Ray version clp-ray is tested with)")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = args[0] if args else "cluster.yaml"
    try:
        problems = check(load(path))
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"{path}: {p}")
    print(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
