"""Offline checks of a Ray cluster-launcher config (``cluster.yaml``).

Ray's own schema and ``prepare_config`` + ``validate_config`` first; then what Ray does not catch,
checked on the **prepared** config — the one Ray will run, with its provider defaults merged in
(AWS's default head command, for one, binds the dashboard to 0.0.0.0 with no token):

- a node type whose ``min_workers`` exceeds its ``max_workers`` (or counts that are not integers);
- ingress rules that, together, open the dashboard/job API (8265), GCS (6379), Ray client (10001)
  or Serve (8000) port to more public addresses than a /8 holds (``--max-open-prefix``), counted
  on the union of the rules' networks with the special-purpose ranges taken out, however the
  CIDRs are split;
- a head ``ray start`` (commands parsed with ``shlex``, not matched as substrings) that would run
  training (``--num-cpus`` not 0), binds the dashboard where it is not proven private (hosts
  parsed as addresses: ``0``, ``::0``, ``[::]``, ``::ffff:0.0.0.0`` bind every interface; a
  ``$VARIABLE``, a host name or a public address are refused too), or starts without
  ``RAY_AUTH_MODE=token`` set for that very command; a worker ``ray start`` without the token;
- a Ray image (cluster-wide, ``head_image``/``worker_image``, or per node type) that is not the
  pinned ``rayproject/ray:<tested version>-…`` one (``latest``, ``nightly``, ``ray-ml``).

    python -m clp_ray.cluster cluster.yaml       # exit 0 when the file passes every check
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import ray
import yaml

# Ray's own cluster-config validation has no public API; these two functions are what `ray up` runs.
from ray.autoscaler._private.util import prepare_config, validate_config

from clp_ray.util import bounded_yaml

PRIVATE_PORTS = {8265: "dashboard / job API", 6379: "GCS", 10001: "Ray client", 8000: "Ray Serve HTTP, unauthenticated"}
# An ingress is open when it reaches more public addresses than a network of this prefix holds.
DEFAULT_MAX_OPEN_PREFIX = 8
# IANA's special-purpose IPv4 blocks (RFC 6890 and successors): not reachable from the internet.
_NON_PUBLIC_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                  "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
                  "203.0.113.0/24", "224.0.0.0/3")
_SEPARATORS = re.compile(r"\s*(?:;|&&|\|\||\||\n)\s*")


def load(path: str | Path) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    with open(path, encoding="utf-8") as f:
        data = bounded_yaml.safe_load(f.read())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return data


def check(config: dict[str, Any], max_open_prefix: int = DEFAULT_MAX_OPEN_PREFIX) -> list[str]:
    """Every problem found (empty when the config is good). An ingress is open when it reaches more
    public addresses than a ``/max_open_prefix`` network holds (default a /8: 16.7M IPv4 addresses)."""

    problems: list[str] = []
    prepared = config
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as e:  # jsonschema.ValidationError, ValueError, TypeError: Ray's own verdict
        problems.append(f"ray validation: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    problems += _worker_counts(prepared)
    problems += _ingress(prepared, max_open_prefix)
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


def _public_networks(version: int) -> list:
    """The publicly routable address space of one IP version, as CIDRs."""
    if version == 6:
        return [ipaddress.ip_network("2000::/3")]  # global unicast; the rest is local, multicast or reserved
    nets = [ipaddress.ip_network("0.0.0.0/0")]
    for special in _NON_PUBLIC_V4:
        special = ipaddress.ip_network(special)
        nets = [part for n in nets for part in (n.address_exclude(special) if special.subnet_of(n) else [n])
                if not part.subnet_of(special)]
    return list(ipaddress.collapse_addresses(nets))


def public_addresses(networks: list) -> int:
    """How many public addresses the union of ``networks`` (one IP version) reaches, however split."""
    if not networks:
        return 0
    union = list(ipaddress.collapse_addresses(networks))
    public = _public_networks(union[0].version)
    # Two CIDRs either nest or are disjoint, so each overlap is the smaller of the two.
    return sum(min(u.num_addresses, p.num_addresses) for u in union for p in public if u.overlaps(p))


def _ingress(config: dict, max_open_prefix: int = DEFAULT_MAX_OPEN_PREFIX) -> list[str]:
    """Private ports that the union of all rules opens to more public addresses than a /max_open_prefix."""
    sg = ((config.get("provider") or {}).get("security_group") or {})
    rules = sg.get("IpPermissions") or []
    problems: list[str] = []
    # port -> IP version -> [(rule index, network)]
    reach: dict[int, dict[int, list]] = {port: {4: [], 6: []} for port in PRIVATE_PORTS}
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        where = f"provider.security_group.IpPermissions[{i}]"
        if not isinstance(rule, dict):
            problems.append(f"{where}: a rule must be a mapping, got {type(rule).__name__}")
            continue
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
    for port, what in PRIVATE_PORTS.items():
        for version, found in reach[port].items():
            bits = 32 if version == 4 else 128
            reached = public_addresses([n for _, n in found])
            if reached <= 2 ** (bits - max_open_prefix):
                continue
            which = ", ".join(str(i) for i in sorted({i for i, _ in found}))
            everyone = reached == public_addresses(_public_networks(version))
            extent = (f"the whole IPv{version} internet" if everyone else
                      f"{reached:,} public IPv{version} addresses (more than a /{max_open_prefix}'s worth)")
            problems.append(f"provider.security_group.IpPermissions[{which}]: open port {port} ({what}) to {extent}")
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


def parse_host(host: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The address a literal host names, in any spelling the socket layer accepts (``0``, ``0x0``,
    ``127.1``, ``[::]``, ``::ffff:0.0.0.0``); None for a name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        if not re.fullmatch(r"[0-9A-Fa-fXx.]+", text):
            return None
        try:  # the inet_aton forms Ray's bind() accepts: one to four parts, decimal, octal or hex
            addr = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def exposed_host(host: str) -> Optional[str]:
    """Why binding to ``host`` may be reachable from outside the node or its private network;
    None only when that is proven (a loopback or private address, or ``localhost``)."""
    text = host.strip()
    if re.search(r"[$`]", text):
        return "a shell variable or command: what it binds is only known when it runs"
    if not text:
        return "an empty host binds every interface"
    if text.lower() == "localhost":
        return None
    addr = parse_host(text)
    if addr is None:
        return "a host name, not an address: it may resolve to a public interface"
    if addr.is_unspecified:
        return "binds every interface"
    if addr.is_loopback or (addr.is_private and not addr.is_multicast):
        return None
    return "a public address"


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
        why = None if host is None else exposed_host(host)
        if why:
            problems.append(f"head_start_ray_commands: dashboard bound to {host} ({why}; "
                            "use 127.0.0.1 and `ray dashboard`)")
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


def _prefix(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a prefix length from 0 to 32")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clp_ray.cluster", description="Check a Ray cluster-launcher "
                                 "config offline: Ray's own validation, then ingress, ray start and image checks.")
    ap.add_argument("path", nargs="?", default="cluster.yaml", help="the cluster config (default: cluster.yaml)")
    ap.add_argument("--max-open-prefix", type=_prefix, default=DEFAULT_MAX_OPEN_PREFIX, metavar="N", help="an ingress to a private port is open when it reaches more public addresses "
                    "than a /N network holds, per IP version (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        problems = check(load(args.path), args.max_open_prefix)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"{args.path}: {p}")
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
