"""Credentials inside URIs stay where they are used and never reach logs, MLflow or summaries."""

import json
import logging
import subprocess
import sys
from pathlib import Path

from clp_ray.util.redact import RedactingFilter, redact, redact_obj
from clp_ray.util.storage import location

ROOT = Path(__file__).resolve().parents[1]
S3 = "s3://AKIAKEY:wJalrSECRET@bucket/ray_results?endpoint_override=minio:9000"


def test_userinfo_and_secret_query_values_are_masked():
    assert redact(S3) == "s3://***@bucket/ray_results?endpoint_override=minio:9000"
    assert redact("https://user:p%40ss@mlflow.example:5000/api") == "https://***@mlflow.example:5000/api"
    assert redact("http://token123@host/x and s3://b/k?secret_key=abc&region=eu&session_token=xyz") == \
        "http://***@host/x and s3://b/k?secret_key=***&region=eu&session_token=***"
    for clean in ("s3://bucket/ray_results", "sqlite:////tmp/mlflow.db", "models:/clp-ray-hi@champion", "a=b", "user@example.com"):
        assert redact(clean) == clean
    assert redact_obj({"a": [S3, 1, {"b": "https://u:p@h"}]}) == {"a": [redact(S3), 1, {"b": "https://***@h"}]}


def test_checkpoint_locations_keep_the_credentials_they_need():
    assert location(S3, "bucket/ray_results/run/checkpoint_1") == \
        "s3://AKIAKEY:wJalrSECRET@bucket/ray_results/run/checkpoint_1?endpoint_override=minio:9000"
    assert location("s3://bucket/x", "bucket/x/c") == "s3://bucket/x/c"


def test_log_records_are_redacted_with_their_arguments():
    record = logging.LogRecord("clp_ray", logging.INFO, __file__, 1, "storage %s, MLflow %s", (S3, "https://u:p@h"), None)
    assert RedactingFilter().filter(record) and record.getMessage() == f"storage {redact(S3)}, MLflow https://***@h"


def test_mlflow_params_tags_and_config_artifact_are_redacted(tmp_path):
    from mlflow import MlflowClient

    from clp_ray.config import load_config
    from clp_ray.tracking.runs import start_run

    cfg = load_config("hi", "tiny", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}", f"train.storage_path={S3}"])
    tracker = start_run(cfg, "secret", tags={"where": S3})
    tracker.log_params(cfg.flat())
    tracker.set_tags({"storage": S3})
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(tracker.run_id)
    assert run.data.params["train.storage_path"] == redact(S3)
    assert run.data.tags["where"] == run.data.tags["storage"] == redact(S3)
    text = Path(MlflowClient(cfg.tracking.tracking_uri).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "wJalrSECRET" not in text and redact(S3) in text


def test_job_summary_and_errors_are_redacted(tmp_path):
    summary = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", "tiny", "--data", "pkg://ko_help", "--split", "dev",
                        "--set", "tracking.tracking_uri=https://user:hunter2@127.0.0.1:9/", "--summary", str(summary)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "hunter2" not in p.stdout + p.stderr + summary.read_text()
    assert json.loads(summary.read_text())["num_queries"] == 920


def test_errors_and_summaries_of_any_job_are_redacted(tmp_path, capsys):
    import argparse

    from clp_ray.cli import run_job
    from clp_ray.errors import ClpRayError

    def failing(args):
        raise ClpRayError(f"cannot reach {S3}")

    assert run_job(failing, argparse.Namespace(summary=None)) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot reach {redact(S3)}"
    out = tmp_path / "s.json"
    assert run_job(lambda args: {"storage": S3, "n": 1}, argparse.Namespace(summary=str(out))) == 0
    assert json.loads(out.read_text()) == {"storage": redact(S3), "n": 1}
