import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clp_ray.cluster import check, load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return load(ROOT / "cluster.yaml")


def test_cluster_yaml_passes_ray_and_our_checks(cluster):
    assert check(cluster) == []
    p = subprocess.run([sys.executable, "-m", "clp_ray.cluster", str(ROOT / "cluster.yaml")], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK")


def test_cluster_yaml_shape_and_security(cluster):
    import ray

    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert len(workers) >= 2
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1 and t["resources"]["GPU"] >= 1
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311-cu12")
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    for rule in rules:
        cidrs = {r["CidrIp"] for r in rule.get("IpRanges", [])}
        if "0.0.0.0/0" in cidrs:
            for port in (8265, 6379, 10001):
                assert not rule["FromPort"] <= port <= rule["ToPort"]
    head_cmd = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in head_cmd and "RAY_AUTH_MODE=token" in head_cmd and "--dashboard-host=127.0.0.1" in head_cmd
    assert "RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"])
    assert any("auth_token" in k for k in cluster["file_mounts"])
    assert any("-e '/home/ray/clp-ray[cluster]'" in c for c in cluster["setup_commands"])


@pytest.mark.parametrize("mutate,expected", [
    (lambda c: c.update(unknown_key=1), "ray validation: Additional properties are not allowed ('unknown_key' was unexpected)"),
    (lambda c: c["available_node_types"]["gpu_a100_x8"].update(min_workers=5), "gpu_a100_x8: min_workers 5 > max_workers 2"),
    (lambda c: c.update(head_node_type="nope"), "ray validation: `head_node_type` must be one of `available_node_types`."),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"FromPort": 8000, "ToPort": 9000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
     "IpPermissions[1]: open port 8265 (dashboard / job API) to the whole IPv4 internet"),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}), "open port 6379 (GCS) to the whole IPv4 internet"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head --num-cpus=0"]), "Ray token authentication is off"),
    (lambda c: c["docker"].update(image="rayproject/ray-ml:2.9.0-py310-gpu"), "ray-ml images are deprecated"),
])
def test_mutated_configs_are_rejected(cluster, mutate, expected):
    bad = copy.deepcopy(cluster)
    mutate(bad)
    problems = check(bad)
    assert any(expected in p for p in problems), problems


def _rule(lo, hi, *cidrs, v6=False):
    key, field = ("Ipv6Ranges", "CidrIpv6") if v6 else ("IpRanges", "CidrIp")
    return {"FromPort": lo, "ToPort": hi, "IpProtocol": "tcp", key: [{field: c} for c in cidrs]}


HEAD_OK = "RAY_AUTH_MODE=token ray start --head --port=6379 --num-cpus=0 --dashboard-host=127.0.0.1"


@pytest.mark.parametrize("mutate,expected", [
    # No head commands: Ray's AWS defaults start the head with --dashboard-host=0.0.0.0 and no token.
    (lambda c: c.pop("head_start_ray_commands"), "dashboard bound to 0.0.0.0"),
    (lambda c: c.pop("head_start_ray_commands"), "Ray token authentication is off for the head"),
    (lambda c: c.update(head_start_ray_commands=[HEAD_OK.replace("--dashboard-host=127.0.0.1", "--dashboard-host 0.0.0.0")]),
     "dashboard bound to 0.0.0.0"),
    (lambda c: c.update(head_start_ray_commands=[HEAD_OK.replace("--dashboard-host=127.0.0.1", "--dashboard-host=::")]),
     "dashboard bound to ::"),
    # The token set on another command than the head's ray start does not reach it.
    (lambda c: c.update(head_start_ray_commands=["RAY_AUTH_MODE=token ray stop", HEAD_OK.removeprefix("RAY_AUTH_MODE=token ")]),
     "Ray token authentication is off for the head"),
    (lambda c: c.update(head_start_ray_commands=["RAY_AUTH_MODE=token ray stop; " + HEAD_OK.removeprefix("RAY_AUTH_MODE=token ")]),
     "Ray token authentication is off for the head"),
    (lambda c: c.update(head_start_ray_commands=["echo RAY_AUTH_MODE=token --num-cpus=0; ray start --head --num-cpus=0"]),
     "Ray token authentication is off for the head"),
    (lambda c: c.update(head_start_ray_commands=[HEAD_OK.replace("--num-cpus=0", "--num-cpus 4")]), "must not run training"),
    (lambda c: c.update(worker_start_ray_commands=["ray start --address=$RAY_HEAD_IP:6379"]),
     "token authentication is off for a worker"),
    # Images pinned per node type or for the head only.
    (lambda c: c["docker"].update(head_image="rayproject/ray:latest"), "docker.head_image rayproject/ray:latest: pin"),
    (lambda c: c["available_node_types"]["gpu_a10g_x4"].update(docker={"worker_image": "rayproject/ray:nightly-gpu"}),
     "available_node_types.gpu_a10g_x4.docker.worker_image rayproject/ray:nightly-gpu: pin"),
    # Rules that only together cover the internet, and CIDRs written unusually.
    (lambda c: c["provider"]["security_group"]["IpPermissions"].extend([_rule(8265, 8265, "0.0.0.0/1"),
                                                                        _rule(8000, 9000, "128.0.0.0/1")]),
     "IpPermissions[1, 2]: open port 8265 (dashboard / job API) to the whole IPv4 internet"),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(_rule(6379, 6379, "10.1.2.3/0")),
     "open port 6379 (GCS) to the whole IPv4 internet"),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(_rule(10001, 10001, "0::/0", v6=True)),
     "open port 10001 (Ray client) to the whole IPv6 internet"),
    # Strings where Ray wants integers: a message, not a traceback.
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(_rule("8000", "9000", "0.0.0.0/0")),
     "FromPort must be an integer, got str '8000'"),
    (lambda c: c["available_node_types"]["gpu_a100_x8"].update(max_workers="2"), "max_workers must be an integer, got str '2'"),
])
def test_the_prepared_config_is_checked_as_ray_will_run_it(cluster, mutate, expected):
    bad = copy.deepcopy(cluster)
    mutate(bad)
    problems = check(bad)
    assert any(expected in p for p in problems), problems


def test_private_ranges_and_small_public_networks_pass(cluster):
    ok = copy.deepcopy(cluster)
    ok["provider"]["security_group"]["IpPermissions"] += [
        _rule(8265, 8265, "10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12", "100.64.0.0/10"),
        _rule(6379, 6379, "8.0.0.0/9"),  # 8.4M public addresses: under a /8's worth
        _rule(10001, 10001, "2001:db8::/16", v6=True)]
    assert check(ok) == []
    # The limit is configurable: a /9 is too much under a /16 limit.
    assert any("open port 6379 (GCS) to 8,388,608 public IPv4 addresses (more than a /16's worth)" in p
               for p in check(ok, max_open_prefix=16))


def _everything_but(addr: str) -> list[str]:
    """0.0.0.0/0 minus one address, as the 32 CIDRs that cover the rest."""
    import ipaddress

    return [str(n) for n in ipaddress.ip_network("0.0.0.0/0").address_exclude(ipaddress.ip_network(f"{addr}/32"))]


@pytest.mark.parametrize("rule,expected", [
    # Half the internet, on every port.
    ({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/1"}]}, "open port 8265 (dashboard / job API) to 2,092,957,696"),
    # Everything but one address: one rule of 32 CIDRs, never adding up to /0.
    (_rule(8265, 8265, *_everything_but("8.8.8.8")), "open port 8265 (dashboard / job API) to 3,702,258,687 public"),
    # A /7 of public space, split into two /8s.
    (_rule(10001, 10001, "11.0.0.0/8", "12.0.0.0/8"), "open port 10001 (Ray client) to 33,554,432 public"),
    (_rule(8000, 8000, "2000::/4", v6=True), "open port 8000 (Ray Serve HTTP, unauthenticated) to"),
])
def test_ingress_is_open_when_its_union_reaches_too_many_public_addresses(cluster, rule, expected):
    bad = copy.deepcopy(cluster)
    bad["provider"]["security_group"]["IpPermissions"].append(rule)
    assert any(expected in p for p in check(bad)), check(bad)


@pytest.mark.parametrize("head", [
    "--dashboard-host=0", "--dashboard-host=::0", "--dashboard-host=[::]", "--dashboard-host 0x0",
    "--dashboard-host=0.0", "--dashboard-host=::ffff:0.0.0.0", "--dashboard-host=0000:0::0", "--dashboard-host=",
    "--dashboard-host=$DASH", "--dashboard-host=${DASH:-127.0.0.1}", "--dashboard-host=`hostname -I`",
    "--dashboard-host=head.example.com", "--dashboard-host=8.8.8.8",
])
def test_dashboard_hosts_are_read_as_addresses_and_refused_unless_proven_private(cluster, head):
    bad = copy.deepcopy(cluster)
    bad["head_start_ray_commands"] = ["export DASH=0.0.0.0; " + HEAD_OK.replace("--dashboard-host=127.0.0.1", head)]
    assert any("dashboard bound to" in p for p in check(bad)), check(bad)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "localhost", "::1", "[::1]", "10.0.0.5", "192.168.1.2"])
def test_loopback_and_private_dashboard_hosts_pass(cluster, host):
    ok = copy.deepcopy(cluster)
    ok["head_start_ray_commands"] = [HEAD_OK.replace("127.0.0.1", host)]
    assert check(ok) == []


def test_cli_help_bombs_and_special_files(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "clp_ray.cluster", *args], capture_output=True, text=True, timeout=60)

    p = run("--help")
    assert p.returncode == 0 and "--max-open-prefix" in p.stdout
    p = run("--max-open-prefix", "40", str(ROOT / "cluster.yaml"))
    assert p.returncode == 2 and "not a prefix length from 0 to 32" in p.stderr
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [{', '.join(['*' + prev] * 10)}]\n" for prev, k in zip("abcdefgh", "bcdefghi")))
    p = run(str(bomb))
    assert p.returncode == 2 and "expand to more than 100,000 nodes" in p.stderr and "Traceback" not in p.stderr
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    p = run(str(fifo))  # would block forever in open() without the check
    assert p.returncode == 2 and "not a regular file" in p.stderr


def test_bad_yaml_and_bad_types_exit_with_a_message(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("- just\n- a list\n")
    p = subprocess.run([sys.executable, "-m", "clp_ray.cluster", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "not a YAML mapping" in p.stderr and "Traceback" not in p.stderr
    cfg = load(ROOT / "cluster.yaml")
    cfg["available_node_types"]["gpu_a100_x8"]["min_workers"] = "lots"
    (tmp_path / "d.yaml").write_text(__import__("yaml").safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "clp_ray.cluster", str(tmp_path / "d.yaml")], capture_output=True, text=True)
    assert p.returncode == 1 and "min_workers must be an integer, got str 'lots'" in p.stdout and "Traceback" not in p.stderr
