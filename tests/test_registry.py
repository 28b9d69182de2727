import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from clp_ray.config import load_config
from clp_ray.model.moe import moe_layers
from clp_ray.tracking.registry import load_registered_embedder, log_embedder_model, promote_if_better
from clp_ray.tracking.runs import start_run

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["셀 보호 해제", "Insert rows above", "차트 데이터 범위"]


@pytest.fixture()
def mlflow_cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return load_config("hi", "tiny", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])


@pytest.fixture()
def moe_folder(tiny_embedder, tmp_path):
    tiny_embedder.upcycle([0, -1], num_experts=3, top_k=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in moe_layers(tiny_embedder.encoder):
            m.router.weight.normal_()
            for ex in m.experts:
                ex.weight.add_(torch.randn_like(ex.weight) * 0.1)
    return tiny_embedder.save_pretrained(tmp_path / "model")


def register(cfg, folder, score, eval_hash="h1"):
    tracker = start_run(cfg, "sweep")
    mv = log_embedder_model(tracker, folder, registered_name="clp-ray-hi",
                            tags={"test_ndcg_at_10": score, "eval_set_hash": eval_hash, "data_hash": "d"})
    tracker.end()
    return mv.version


@pytest.mark.slow
def test_promotion_rule(mlflow_cfg, moe_folder):
    from mlflow import MlflowClient

    uri = mlflow_cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    v1 = register(mlflow_cfg, moe_folder, 0.5)
    assert promote_if_better(uri, "clp-ray-hi", v1).promoted
    v2 = register(mlflow_cfg, moe_folder, 0.4)
    p2 = promote_if_better(uri, "clp-ray-hi", v2)
    assert not p2.promoted and client.get_model_version_by_alias("clp-ray-hi", "champion").version == v1
    assert client.get_model_version("clp-ray-hi", v2).tags["clp_ray.not_promoted_reason"] == \
        "not promoted: test_ndcg_at_10 0.4000 <= champion v1 0.5000"
    v3 = register(mlflow_cfg, moe_folder, 0.6)
    assert promote_if_better(uri, "clp-ray-hi", v3).promoted
    assert client.get_model_version_by_alias("clp-ray-hi", "champion").version == v3
    # A champion scored on another evaluation set is re-scored on this one before comparing.
    v4 = register(mlflow_cfg, moe_folder, 0.7, eval_hash="h2")
    rescored = []
    p4 = promote_if_better(uri, "clp-ray-hi", v4, rescore=lambda u: rescored.append(u) or 0.9)
    assert rescored == [f"models:/clp-ray-hi/{v3}"] and not p4.promoted and "0.7000 <= champion v3 0.9000" in p4.reason
    p4b = promote_if_better(uri, "clp-ray-hi", v4)  # no way to re-score: stays unpromoted, says why
    assert not p4b.promoted and "evaluated on another set" in p4b.reason
    assert client.get_model_version_by_alias("clp-ray-hi", "champion").version == v3


@pytest.mark.slow
def test_a_model_that_does_not_beat_the_base_model_is_never_promoted(mlflow_cfg, moe_folder):
    from mlflow import MlflowClient

    uri = mlflow_cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    v1 = register(mlflow_cfg, moe_folder, 0.5)
    p1 = promote_if_better(uri, "clp-ray-hi", v1, base_score=0.55)  # the first version too
    assert not p1.promoted and p1.reason == "not promoted: test_ndcg_at_10 0.5000 does not beat the base model's 0.5500"
    assert client.get_model_version("clp-ray-hi", v1).tags["clp_ray.not_promoted_reason"] == p1.reason
    assert not client.get_registered_model("clp-ray-hi").aliases
    v2 = register(mlflow_cfg, moe_folder, 0.6)
    assert promote_if_better(uri, "clp-ray-hi", v2, base_score=0.55).promoted
    assert client.get_model_version_by_alias("clp-ray-hi", "champion").version == v2


@pytest.mark.slow
def test_registered_model_loads_in_a_fresh_process(mlflow_cfg, moe_folder, tmp_path):
    from clp_ray.model.embedder import Embedder

    uri = mlflow_cfg.tracking.tracking_uri
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = register(mlflow_cfg, moe_folder, 0.5)
    assert not [w for w in caught if "input example" in str(w.message)]  # the signature is complete as is
    promote_if_better(uri, "clp-ray-hi", v)
    expected = Embedder.from_pretrained(moe_folder).encode(TEXTS).numpy()
    script = (
        "import json, sys, mlflow, numpy as np\n"
        "m = mlflow.pyfunc.load_model('models:/clp-ray-hi@champion')\n"
        f"out = m.predict({TEXTS!r})\n"
        "np.save(sys.argv[1], out)\n"
        "try:\n    m.predict('not a list')\nexcept Exception as e:\n    print('ERR', e)\n"
        # params reach predict (an MLflow signature without a params schema would drop them)
        f"try:\n    m.predict({TEXTS!r}, params={{'batch_size': 0}})\nexcept Exception as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.npy")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = np.load(tmp_path / "out.npy")
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert "predict expects a list of strings, got str" in p.stdout
    assert "params['batch_size'] must be >= 1, got 0" in p.stdout
    assert "Add type hints to the `predict` method" not in p.stderr  # MLflow's per-import warning is off

    # The same URI works wherever a model reference is accepted.
    emb = load_registered_embedder("models:/clp-ray-hi@champion")
    assert emb.moe_spec is not None and len(moe_layers(emb.encoder)) == 2
    summary = tmp_path / "s.json"
    p = subprocess.run([sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", "models:/clp-ray-hi@champion",
                        "--data", "pkg://ko_help", "--split", "dev", "--summary", str(summary)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(summary.read_text())["metrics"]["ndcg@10"] > 0
    # The store named in the config (not $MLFLOW_TRACKING_URI, not MLflow's default in the working
    # directory, which would be an empty registry or another one) is where models:/ resolves.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env.pop("MLFLOW_TRACKING_URI")
    p = subprocess.run([sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", "models:/clp-ray-hi@champion",
                        "--data", "pkg://ko_help", "--split", "dev", "--set", f"tracking.tracking_uri={uri}",
                        "--summary", str(summary)], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(summary.read_text())["metrics"]["ndcg@10"] > 0 and not (elsewhere / "mlflow.db").exists()


def test_check_tracking_fails_fast_with_the_setting(mlflow_cfg, tmp_path, monkeypatch):
    import time

    from clp_ray.errors import ClpRayError
    from clp_ray.tracking.runs import check_tracking

    assert check_tracking(mlflow_cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    (tmp_path / "a-file").write_text("")
    cases = {
        f"sqlite:///{tmp_path / 'a-file' / 'm.db'}": r"cannot write to .*a-file/m.db \(.*a-file is a file, not a folder\)",
        "bogus://x": r"cannot use this MLflow tracking store: Unsupported.*'bogus://x'",
        # Port 9 (discard) refuses at once; MLflow's default retries would take about 5 minutes.
        "http://127.0.0.1:9": r"cannot use this MLflow tracking store: MlflowException: API request to http://127.0.0.1:9/",
    }
    for uri, pattern in cases.items():
        cfg = load_config("hi", "tiny", [f"tracking.tracking_uri={uri}"])
        t = time.monotonic()
        with pytest.raises(ClpRayError, match=rf"^tracking.tracking_uri = {uri} \(--set tracking.tracking_uri={uri}\): {pattern}"):
            check_tracking(cfg)
        assert time.monotonic() - t < 60
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the quick settings are restored
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://env")
    with pytest.raises(ClpRayError, match=r"^\$MLFLOW_TRACKING_URI = bogus://env: cannot use"):
        check_tracking(load_config("hi", "tiny"))


@pytest.mark.slow
def test_nan_never_wins_and_never_blocks(mlflow_cfg, moe_folder):
    from mlflow import MlflowClient

    uri = mlflow_cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    v1 = register(mlflow_cfg, moe_folder, float("nan"))
    p1 = promote_if_better(uri, "clp-ray-hi", v1)  # a NaN first version does not become @champion
    assert not p1.promoted and "missing or not a number ('nan')" in p1.reason
    v2 = register(mlflow_cfg, moe_folder, 0.4)
    assert promote_if_better(uri, "clp-ray-hi", v2).promoted
    client.set_model_version_tag("clp-ray-hi", v2, "test_ndcg_at_10", "nan")  # the champion's metric goes bad
    v3 = register(mlflow_cfg, moe_folder, 0.3)
    p3 = promote_if_better(uri, "clp-ray-hi", v3)  # ... and does not block a scored version
    assert p3.promoted and p3.reason == f"promoted: test_ndcg_at_10 0.3000 > champion v{v2} no usable score"


@pytest.mark.slow
def test_concurrent_promotions_keep_the_better_model(mlflow_cfg, moe_folder, monkeypatch):
    """Two jobs promoting at once both read the same champion; without the lock the one that moves
    the alias last wins, even when it is the worse model."""
    import threading
    import time

    from mlflow import MlflowClient

    uri = mlflow_cfg.tracking.tracking_uri
    v1 = register(mlflow_cfg, moe_folder, 0.5)
    promote_if_better(uri, "clp-ray-hi", v1)
    better, worse = register(mlflow_cfg, moe_folder, 0.7), register(mlflow_cfg, moe_folder, 0.6)
    read = MlflowClient.get_model_version_by_alias
    delay = {better: 0.0, worse: 0.6}  # the worse one reads the champion, then moves the alias last
    current = threading.local()

    def slow_read(self, name, alias):
        out = read(self, name, alias)
        time.sleep(delay[current.version])
        return out

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", slow_read)
    results = {}

    def promote(version):
        current.version = version
        results[version] = promote_if_better(uri, "clp-ray-hi", version)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (worse, better)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", read)
    assert MlflowClient(uri).get_model_version_by_alias("clp-ray-hi", "champion").version == better
    # Serialised: the worse one (first in) replaced v1, then the better one replaced it.
    assert results[worse].previous == v1 and results[better].promoted and results[better].previous == worse
