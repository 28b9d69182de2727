"""Job plumbing shared by every entry point: the --summary contract and output-path checks."""

import argparse
import json
import sys

import pytest

from clp_ray.cli import EXIT_USER_ERROR, run_job
from clp_ray.errors import ClpRayError
from clp_ray.util.atomic import check_writable


def test_summary_is_written_atomically_and_kept_on_stdout_when_it_cannot_be(tmp_path, capsys):
    path = tmp_path / "out" / "s.json"
    assert run_job(lambda a: {"metric": 0.5}, argparse.Namespace(summary=str(path))) == 0
    assert json.loads(path.read_text()) == {"metric": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]  # no temp or probe file left

    def job_that_loses_its_summary_path(args):  # e.g. the disk or folder went away during the job
        path.unlink()
        path.mkdir()
        return {"metric": 0.75, "model_path": "/models/x"}

    code = run_job(job_that_loses_its_summary_path, argparse.Namespace(summary=str(path)))
    out, err = capsys.readouterr()
    assert code == EXIT_USER_ERROR
    assert json.loads(out) == {"metric": 0.75, "model_path": "/models/x"}  # the result is not lost
    assert f"error: --summary: cannot write to {path} (Is a directory)" in err and "printed above" in err


def test_check_writable_refuses_folders_and_unreachable_paths(tmp_path):
    check_writable(str(tmp_path / "new" / "deeper" / "f.json"), "--out")  # parents are created
    assert (tmp_path / "new" / "deeper").is_dir() and not any((tmp_path / "new" / "deeper").iterdir())
    with pytest.raises(ClpRayError, match=r"--out: .* is a folder; give a file path"):
        check_writable(str(tmp_path), "--out")
    (tmp_path / "f").write_text("")
    with pytest.raises(ClpRayError, match=r"--summary: cannot write to .*f/s.json \(.*/f is a file, not a folder\)"):
        check_writable(str(tmp_path / "f" / "s.json"), "--summary")
    check_writable(str(tmp_path / "runs" / "a"), "train.output_dir", folder=True)  # a folder is created
    assert (tmp_path / "runs" / "a").is_dir() and not any((tmp_path / "runs" / "a").iterdir())
    with pytest.raises(ClpRayError, match=r"train.output_dir: .*/f is a file, not a folder"):
        check_writable(str(tmp_path / "f"), "train.output_dir", folder=True)


def test_the_worker_payload_imports_without_the_training_stack():
    """Ray Train's controller unpickles the WorkerPayload: its import must not pull in torch,
    DeepSpeed, transformers or MLflow (``clp_ray.train`` re-exports the rest lazily)."""
    import subprocess
    import sys

    code = ("import sys, clp_ray.train.payload, clp_ray.train as t\n"
            "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'mlflow', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(t.deepspeed_config) and t.plan_steps.__module__ == 'clp_ray.train.schedule'\n"
            "assert 'torch' in sys.modules and t.run_training.__module__ == 'clp_ray.train.run'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_local_ray_instance_runs_no_preemption_watcher_unless_asked(monkeypatch):
    """ensure_ray's runtime env (ray.init recorded, not called): a local instance turns Ray Train's
    PreemptionWatcher off, a user's own setting wins, and a cluster address keeps Ray's default."""
    import ray

    from clp_ray.config import load_config
    from clp_ray.train import ensure_ray
    from clp_ray.train.run import extensions_dir
    from clp_ray.util.cache import cache_root

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    cfg = load_config("hi", "tiny")
    ensure_ray(cfg)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    ensure_ray(cfg)
    ensure_ray(load_config("hi", "tiny", ["ray.address=ray://head:10001"]))
    envs = [c["runtime_env"]["env_vars"] for c in calls]
    assert envs[0]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and envs[1]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    assert "address" not in calls[0] and calls[2]["address"] == "ray://head:10001"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in envs[2] and envs[2]["DS_ACCELERATOR"] == "cpu"
    # DeepSpeed's JIT ops: one folder per interpreter on a local instance, the cluster's own default otherwise.
    assert envs[0]["TORCH_EXTENSIONS_DIR"] == str(extensions_dir()) and "TORCH_EXTENSIONS_DIR" not in envs[2]
    assert extensions_dir().parent == cache_root() / "torch_extensions" and sys.prefix not in str(extensions_dir())


def test_extension_folders_differ_per_interpreter(monkeypatch):
    from clp_ray.train.run import extensions_dir

    monkeypatch.setattr(sys, "prefix", "/venvs/a/.venv")
    a = extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/venvs/b/.venv")
    assert a != extensions_dir() and a.name.startswith(".venv-")
