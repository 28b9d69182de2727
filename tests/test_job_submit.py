"""The cluster path on one machine: `ray job submit` to a local head that the test starts and stops."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.ray]
RAY = str(Path(sys.executable).parent / "ray")
EXCLUDES = json.dumps({"excludes": [".venv", ".git", "outputs", "mlruns", "mlartifacts", "*.db", "__pycache__"]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def env(ray_cli_env):
    return ray_cli_env


@pytest.fixture()
def local_head(env):
    port, dash = free_port(), free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def submit(address, env, *job_args):
    return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                           "--runtime-env-json", EXCLUDES, "--", "python", *job_args],
                          env=env, capture_output=True, text=True, timeout=900)


def test_ray_job_submit_tune_succeeds_and_bad_language_fails(local_head, env, small_data, tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    sets = [f"data.train_paths=[{small_data}]", "data.train_group_size=2", "data.dev_fraction=0.2",
            "train.per_device_batch_size=4", "train.epochs=1", f"train.output_dir={tmp_path / 'out'}",
            f"tracking.tracking_uri=sqlite:///{db}", "search.num_samples=1", "search.max_concurrent_trials=1"]
    args = ["jobs/tune.py", "--lang", "ko", "--profile", "tiny"]
    for s in sets:
        args += ["--set", s]
    ok = submit(local_head, env, *args)
    out = ok.stdout + ok.stderr
    assert ok.returncode == 0 and re.search(r"Job '.*' succeeded", out), out[-4000:]
    assert "registered clp-ray-ko version 1" in out
    assert str(MlflowClient(f"sqlite:///{db}").get_model_version_by_alias("clp-ray-ko", "champion").version) == "1"

    bad = submit(local_head, env, "jobs/tune.py", "--lang", "xx", "--profile", "tiny")
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and re.search(r"Job '.*' failed", out), out[-4000:]
    assert "unknown language 'xx'" in out and "known languages: fa, hi, ko" in out
