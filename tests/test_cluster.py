import copy
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


def test_closed_splits_of_the_internet_and_private_ranges_pass(cluster):
    ok = copy.deepcopy(cluster)
    ok["provider"]["security_group"]["IpPermissions"] += [_rule(8265, 8265, "10.0.0.0/8", "192.168.0.0/16"),
                                                          _rule(8265, 8265, "0.0.0.0/1")]  # half of it only
    assert check(ok) == []


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
