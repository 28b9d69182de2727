"""Autoscaling on one machine: a fake multi-node cluster launches cluster.yaml's A10G node type from
zero for a training run that asks for A10G, the run's workers live on that node, and the node is
released once idle."""

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.cluster_utils import AutoscalingCluster

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.ray]

# Ray's fake_multinode provider config. AutoscalingCluster reads it from
# ray/autoscaler/_private/fake_multi_node/example.yaml, which the PyPI wheel does not ship.
FAKE_PROVIDER_BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


class FakeAutoscalingCluster(AutoscalingCluster):
    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = copy.deepcopy(FAKE_PROVIDER_BASE)
        config["available_node_types"] = {
            **worker_node_types, "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}}
        config.update(config_kwargs)
        return config


@pytest.fixture()
def env(ray_cli_env):
    return ray_cli_env


def a10g_node_type() -> tuple[str, dict]:
    """cluster.yaml's A10G worker type: its accelerator resources, CPUs scaled to this machine."""
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    name, spec = next((n, t) for n, t in types.items() if "A10G" in t.get("resources", {}))
    assert spec["min_workers"] == 0
    resources = {**spec["resources"], "CPU": 4, "object_store_memory": 200 * 1024**2}
    return name, {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": 1}


def ray_list(kind: str, env: dict, *args: str) -> list[dict]:
    out = subprocess.run([RAY, "list", kind, "--format", "json", "--detail", *args], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)


def test_gpu_node_type_launches_from_zero_runs_training_and_is_released(env, small_data, tmp_path):
    node_type, spec = a10g_node_type()
    assert spec["resources"]["GPU"] >= 2 and spec["resources"]["A10G"] >= 2
    cluster = FakeAutoscalingCluster(head_resources={"CPU": 2, "object_store_memory": 200 * 1024**2},
                                     worker_node_types={node_type: spec})
    cluster.start()
    try:
        # Nothing but the head at first.
        assert [n["state"] for n in ray_list("nodes", env)] == ["ALIVE"]

        # CPU compute (the GPUs are only logical), but every worker asks for one A10G, which only
        # the worker node type has.
        summary = tmp_path / "summary.json"
        run = subprocess.run(
            [sys.executable, "jobs/train.py", "--lang", "ko", "--profile", "tiny", "--summary", str(summary),
             "--set", f"data.train_paths=[{small_data}]", "--set", "data.train_group_size=2",
             "--set", "data.dev_fraction=0.2", "--set", "train.per_device_batch_size=4", "--set", "train.max_steps=2",
             "--set", "train.eval_every_steps=2", "--set", f"train.output_dir={tmp_path / 'out'}",
             "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
             "--set", "ray.use_gpu=false", "--set", "ray.cpus_per_worker=1", "--set", "ray.num_workers=2",
             "--set", "ray.resources_per_worker={A10G: 1}", "--set", "ray.autoscaling=true"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": "auto"}, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        result = json.loads(summary.read_text())
        assert result["metrics"]["step"] == 2 and result["metrics"]["final"] is True

        nodes = ray_list("nodes", env)
        launched = [n for n in nodes if n["resources_total"].get("A10G") == spec["resources"]["A10G"]]
        assert len(launched) == 1, nodes
        gpu_node = launched[0]["node_id"]
        workers = ray_list("actors", env, "--filter", "class_name=RayTrainWorker")
        assert workers and {w["node_id"] for w in workers} == {gpu_node}

        # idle_timeout_minutes 0.1: the autoscaler terminates the idle node within seconds.
        deadline = time.time() + 120
        while time.time() < deadline:
            state = {n["node_id"]: n["state"] for n in ray_list("nodes", env)}
            if state[gpu_node] == "DEAD":
                break
            time.sleep(2)
        assert state[gpu_node] == "DEAD"
        assert sum(s == "ALIVE" for s in state.values()) == 1  # the head
    finally:
        cluster.shutdown()
