"""A small sweep end to end: Tune + Optuna + ASHA over Ray Train trials, MLflow parent/child runs,
registry; and resuming an interrupted sweep."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clp_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.ray]


def sweep_sets(tmp_path, data, *extra, tracking=True):
    return [f"data.train_paths=[{data}]", "data.train_group_size=2", "data.dev_fraction=0.2",
            "train.per_device_batch_size=4", "train.epochs=3", f"train.output_dir={tmp_path / 'out'}",
            *([f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if tracking else []), "search.num_samples=4",
            "search.max_concurrent_trials=2", "search.asha_reduction_factor=4", "search.learning_rate=[1.0e-6, 3.0e-3]",
            "train.log_every_steps=1", "ray.num_cpus=5", *extra]


def test_small_sweep_prunes_registers_and_tracks(tmp_path, small_data, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from clp_ray.tracking.runs import tracking_uri
    from clp_ray.train import ensure_ray
    from clp_ray.tune import run_tune_job

    # The default MLflow URI (SQLite in the working directory): trials, which run in working
    # directories of their own, must still log into the driver's database.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Trials on URI storage (as s3:// on the cluster profile): sweep state, checkpoints and the
    # best model are reached through pyarrow's filesystem, the model copied locally to register it.
    cfg = load_config("ko", "tiny", sweep_sets(tmp_path, small_data, f"train.storage_path=file://{tmp_path / 'ray'}",
                                                tracking=False))
    ensure_ray(cfg)
    try:
        out = run_tune_job(cfg)
    finally:
        ray.shutdown()
    assert len(out.trials) == 4
    statuses = [t.status for t in out.trials]
    assert statuses.count("pruned") >= 1 and statuses.count("completed") >= 1, statuses
    assert all(t.iterations < 3 for t in out.trials if t.status == "pruned")
    assert all(t.iterations == 3 for t in out.trials if t.status == "completed")
    s = cfg.search
    p = out.best.params
    assert s.lam[0] <= p["lam"] <= s.lam[1] and s.temperature[0] <= p["temperature"] <= s.temperature[1]
    assert s.learning_rate[0] <= p["learning_rate"] <= s.learning_rate[1]
    assert p["num_experts"] in s.num_experts and p["top_k"] in s.top_k and 0 <= p["moe_layer"] <= 3
    assert out.best.dev_metric == max(t.dev_metric for t in out.trials if t.status == "completed")
    assert out.best.model_path.startswith(f"file://{tmp_path / 'ray'}/") and out.best.model_path.endswith("/model")
    assert set(out.test_metrics) == set(out.base_test_metrics) == {"ndcg@10", "ndcg@5", "recall@100", "mrr@10"}
    assert 0 <= out.p_value_vs_base <= 1 and out.test_metrics["ndcg@10"] > out.base_test_metrics["ndcg@10"]
    # The base model's test and dev results, cached; the dev one is every trial's starting point.
    assert len(list((tmp_path / "out" / "base_eval").glob("*.json"))) == 2
    # Selection ran on the sample's dev queries over its full corpus.
    assert (out.dev_set.source, out.dev_set.queries, out.dev_set.corpus_size) == ("qrels", 920, 1519)

    client = MlflowClient(tracking_uri(cfg))
    parent = client.get_run(out.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert len(children) == 4
    by_trial = {c.data.tags["clp_ray.trial_id"]: c for c in children}
    for t in out.trials:
        run = by_trial[t.trial_id]
        assert run.data.tags["clp_ray.status"] == t.status
        assert run.info.status == ("FINISHED" if t.status == "completed" else "KILLED")
        assert "train/loss" in run.data.metrics
        assert run.data.params["dev_set.corpus_size"] == "1519" and run.data.params["dev_set.source"] == "qrels"
        assert run.data.metrics["dev_ndcg_at_10_init"] == pytest.approx(out.base_dev_metrics["ndcg@10"])
    arts = {a.path for a in client.list_artifacts(out.parent_run_id, "plots")}
    assert arts == {"plots/optimization_history.png", "plots/param_importances.png", "plots/dev_metric_per_trial.png"}
    assert parent.data.metrics["test_ndcg_at_10"] == pytest.approx(out.test_metrics["ndcg@10"])
    assert parent.data.metrics["base_test_ndcg_at_10"] == pytest.approx(out.base_test_metrics["ndcg@10"])
    assert parent.data.params["model_settings.pooling"] == "mean"  # the tiny model's own folder says so
    mv = client.get_model_version_by_alias("clp-ray-ko", "champion")
    assert mv.version == out.version and mv.tags["trial_id"] == out.best.trial_id
    for key in ("data_hash", "eval_set_hash", "git_commit", "param.lam", "dev_ndcg_at_10", "test_ndcg_at_10",
                "base_test_ndcg_at_10", "p_value_vs_base"):
        assert key in mv.tags


def test_interrupted_sweep_resumes_without_repeating_finished_trials(tmp_path, small_data):
    from mlflow import MlflowClient

    sets = sweep_sets(tmp_path, small_data, "search.num_samples=2", "search.max_concurrent_trials=1", "train.epochs=1")
    cmd = [sys.executable, "jobs/tune.py", "--lang", "ko", "--profile", "tiny", "--summary", str(tmp_path / "s.json")]
    for s in sets:
        cmd += ["--set", s]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 600
    for line in proc.stdout:  # wait until the first trial has finished, then interrupt like Ctrl+C
        lines.append(line)
        if "[sweep] 1/2 trials finished" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
        assert time.time() < deadline, "".join(lines[-50:])
    rest, _ = proc.communicate(timeout=300)
    lines.append(rest)
    out = "".join(lines)
    assert proc.returncode == 130, out[-4000:]
    assert "interrupted: sweep tune-ko-" in out and "re-run the same command to resume it" in out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("clp-ray-ko")
    finished_before = {r.data.tags["clp_ray.trial_id"] for r in client.search_runs(
        [exp.experiment_id], filter_string="tags.`clp_ray.kind` = 'trial' and attributes.status = 'FINISHED'")}
    assert len(finished_before) >= 1

    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert len(summary["trials"]) == 2
    assert set(summary["base_test_metrics"]) == set(summary["test_metrics"]) and 0 <= summary["p_value_vs_base"] <= 1
    assert summary["dev_set"]["corpus_size"] == 1519 and summary["dev_set"]["queries"] == 920
    assert set(summary["base_dev_metrics"]) == set(summary["test_metrics"])
    trial_runs = client.search_runs([exp.experiment_id], filter_string="tags.`clp_ray.kind` = 'trial'")
    per_trial: dict[str, int] = {}
    for r in trial_runs:
        per_trial[r.data.tags["clp_ray.trial_id"]] = per_trial.get(r.data.tags["clp_ray.trial_id"], 0) + 1
    for tid in finished_before:
        assert per_trial[tid] == 1  # a finished trial was not run again
    assert set(per_trial) == {t["trial_id"] for t in summary["trials"]}
