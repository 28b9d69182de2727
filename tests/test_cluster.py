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
     "IpPermissions[1]: opens port 8265 (dashboard / job API) to the internet"),
    (lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}), "opens port 6379 (GCS) to the internet"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head --num-cpus=0"]), "Ray token authentication is off"),
    (lambda c: c["docker"].update(image="rayproject/ray-ml:2.9.0-py310-gpu"), "ray-ml images are deprecated"),
])
def test_mutated_configs_are_rejected(cluster, mutate, expected):
    bad = copy.deepcopy(cluster)
    mutate(bad)
    problems = check(bad)
    assert any(expected in p for p in problems), problems
