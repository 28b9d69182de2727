"""Offline checks of a Ray cluster-launcher config (``cluster.yaml``).

Ray's own schema and ``prepare_config`` + ``validate_config`` first; then what Ray does not catch,
checked on the **prepared** config — the one Ray will run, with its provider defaults merged in
(AWS's default head command, for one, binds the dashboard to 0.0.0.0 with no token):

- a node type whose ``min_workers`` exceeds its ``max_workers`` (or counts that are not integers);
- ingress rules that, together, open the dashboard/job API (8265), GCS (6379) or Ray client
  (10001) port to the whole IPv4 or IPv6 internet, however the CIDRs are written;
- a head ``ray start`` (commands parsed with ``shlex``, not matched as substrings) that would run
  training (``--num-cpus`` not 0), binds the dashboard to every interface, or starts without
  ``RAY_AUTH_MODE=token`` set for that very command; a worker ``ray start`` without the token;
- a Ray image (cluster-wide, ``head_image``/``worker_image``, or per node type) that is not the
  pinned ``rayproject/ray:<tested version>-…`` one (``latest``, ``nightly``, ``ray-ml``).

    python -m clp_ray.cluster cluster.yaml       # exit 0 when the file passes every check
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import ray
import yaml

# Ray's own cluster-config validation has no public API; these two functions are what `ray up` runs.
from ray.autoscaler._private.util import prepare_config, validate_config

PRIVATE_PORTS = {8265: "dashboard / job API", 6379: "GCS", 10001: "Ray client", 8000: "Ray Serve HTTP, unauthenticated"}
PUBLIC_HOSTS = {"0.0.0.0", "::", "[::]", "0:0:0:0:0:0:0:0"}
_SEPARATORS = re.compile(r"\s*(?:;|&&|\|\||\||\n)\s*")


def load(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return data


def check(config: dict[str, Any]) -> list[str]:
    """Every problem found (empty when the config is good)."""

    problems: list[str] = []
    prepared = config
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as e:  # jsonschema.ValidationError, ValueError, TypeError: Ray's own verdict
        problems.append(f"ray validation: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    problems += _worker_counts(prepared)
    problems += _ingress(prepared)
    problems += _ray_start(prepared)
    problems += _images(prepared)
    return problems


# --------------------------------------------------------------------------------------------
# Node counts.


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _worker_counts(config: dict) -> list[str]:
    problems = []
    for name, node in (config.get("available_node_types") or {}).items():
        node = node if isinstance(node, dict) else {}
        counts = {k: node[k] for k in ("min_workers", "max_workers") if k in node}
        bad = [f"{k} must be an integer, got {type(v).__name__} {v!r}" for k, v in counts.items() if _int(v) is None]
        if bad:
            problems += [f"available_node_types.{name}: {b}" for b in bad]
        elif counts.get("min_workers", 0) > counts.get("max_workers", counts.get("min_workers", 0)):
            problems.append(f"available_node_types.{name}: min_workers {counts['min_workers']} > "
                            f"max_workers {counts['max_workers']}")
    return problems


# --------------------------------------------------------------------------------------------
# Ingress.


def _ingress(config: dict) -> list[str]:
    """Private ports reachable from the whole internet through the union of all rules."""
    sg = ((config.get("provider") or {}).get("security_group") or {})
    rules = sg.get("IpPermissions") or []
    problems: list[str] = []
    # port -> IP version -> [(rule index, network)]
    reach: dict[int, dict[int, list]] = {port: {4: [], 6: []} for port in PRIVATE_PORTS}
    for i, rule in enumerate(rules):
        where = f"provider.security_group.IpPermissions[{i}]"
        ports, err = _rule_ports(rule)
        if err:
            problems.append(f"{where}: {err}")
            continue
        nets, errs = _rule_networks(rule)
        problems += [f"{where}: {e}" for e in errs]
        for port in PRIVATE_PORTS:
            if ports is None or ports[0] <= port <= ports[1]:
                for net in nets:
                    reach[port][net.version].append((i, net))
    everything = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
    for port, what in PRIVATE_PORTS.items():
        for version, found in reach[port].items():
            if found and list(ipaddress.collapse_addresses(n for _, n in found)) == [everything[version]]:
                which = ", ".join(str(i) for i in sorted({i for i, _ in found}))
                problems.append(f"provider.security_group.IpPermissions[{which}]: open port {port} ({what}) to the "
                                f"whole IPv{version} internet")
    return problems


def _rule_ports(rule: dict) -> tuple[Optional[tuple[int, int]], Optional[str]]:
    """(from, to) of a rule, None for all ports (protocol -1); or an error for non-integer ports."""
    if str(rule.get("IpProtocol")) in ("-1", "all"):
        return None, None
    lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
    for name, v in (("FromPort", lo), ("ToPort", hi)):
        if _int(v) is None:
            return None, f"{name} must be an integer, got {type(v).__name__} {v!r}"
    return (lo, hi), None


def _rule_networks(rule: dict) -> tuple[list, list[str]]:
    nets, errs = [], []
    for key, field in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
        for entry in rule.get(key) or []:
            cidr = entry.get(field) if isinstance(entry, dict) else entry
            try:
                nets.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
            except ValueError:
                errs.append(f"{key}: {cidr!r} is not a CIDR")
    return nets, errs


# --------------------------------------------------------------------------------------------
# ray start commands.


def _ray_starts(commands: list) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, arguments after ``ray start``) of every ``ray start`` in a command list.
    Each entry is one shell; an ``export``/``VAR=value`` prefix applies to its own command (export:
    also to the later commands of that entry)."""
    found = []
    for entry in commands or []:
        exported: dict[str, str] = {}
        for part in _SEPARATORS.split(str(entry)):
            try:
                tokens = shlex.split(part)
            except ValueError:
                continue
            env = dict(exported)
            while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
                k, _, v = tokens.pop(0).partition("=")
                env[k] = v
            if tokens[:1] == ["export"]:
                exported.update(dict(t.partition("=")[::2] for t in tokens[1:] if "=" in t))
                continue
            if tokens[:2] == ["ray", "start"]:
                found.append((env, tokens[2:]))
    return found


def _option(args: list[str], name: str) -> Optional[str]:
    """The value of ``--name=value`` or ``--name value`` (the last one given), else None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _ray_start(config: dict) -> list[str]:
    problems = []
    heads = [(env, args) for env, args in _ray_starts(config.get("head_start_ray_commands")) if "--head" in args]
    if not heads:
        problems.append("head_start_ray_commands: no `ray start --head` found")
    for env, args in heads:
        if _option(args, "--num-cpus") != "0":
            problems.append("head_start_ray_commands: the head must not run training (ray start --head --num-cpus=0)")
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append("head_start_ray_commands: Ray token authentication is off for the head's `ray start` "
                            "(prefix it with RAY_AUTH_MODE=token)")
        host = _option(args, "--dashboard-host")
        if host is not None and host.strip() in PUBLIC_HOSTS:
            problems.append(f"head_start_ray_commands: dashboard bound to {host} (use 127.0.0.1 and `ray dashboard`)")
    for env, _ in _ray_starts(config.get("worker_start_ray_commands")):
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append("worker_start_ray_commands: Ray token authentication is off for a worker's `ray start`")
    return problems


# --------------------------------------------------------------------------------------------
# Images.


def _images(config: dict) -> list[str]:

    found = []
    docker = config.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if docker.get(key):
            found.append((f"docker.{key}", docker[key]))
    for name, node in (config.get("available_node_types") or {}).items():
        node_docker = (node or {}).get("docker") or {} if isinstance(node, dict) else {}
        for key in ("image", "head_image", "worker_image"):
            if node_docker.get(key):
                found.append((f"available_node_types.{name}.docker.{key}", node_docker[key]))
    want = f"rayproject/ray:{ray.__version__}-"
    problems = []
    for where, image in found:
        image = str(image)
        if "ray-ml" in image:
            problems.append(f"{where} {image}: rayproject/ray-ml images are deprecated and frozen")
        elif not image.startswith(want):
            problems.append(f"{where} {image}: pin {want}<python>-<cuda> (the Ray version clp-ray is tested with; "
                            "not latest or nightly)")
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
