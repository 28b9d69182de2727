"""The registered pyfunc behind `mlflow models serve`: real HTTP on 127.0.0.1, and what the logged
model carries so that it can be served (its code and installable requirements)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import free_port, http, perturbed_moe_folder, register_model, wait_until_up
from packaging.requirements import Requirement

from clp_ray.tracking.pyfunc import MAX_PREDICT_TEXTS

TEXTS = ["셀 보호 해제", "Insert rows above", "차트 데이터 범위"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from clp_ray.config import TinyModelConfig
    from clp_ray.model.tiny import tiny_model_path

    root = tmp_path_factory.mktemp("mlflow_serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # MoE layers and BGE-M3's heads: everything the pyfunc has to carry
    folder = perturbed_moe_folder(tiny_model_path(TinyModelConfig(m3_heads=True)), root / "moe")
    register_model(uri, folder)
    return uri, root


@pytest.fixture(scope="module")
def server(store):
    uri, root = store
    port = free_port()
    bin_dir = Path(sys.executable).parent  # `mlflow models serve` runs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/clp-ray-hi@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def pyfunc(store):
    mlflow.set_tracking_uri(store[0])
    return mlflow.pyfunc.load_model("models:/clp-ray-hi@champion")


def test_invocations_answer_the_pyfuncs_embeddings(server, pyfunc):
    for params in (None, {"kind": "passage"}):
        body = {"inputs": TEXTS, **({"params": params} if params else {})}
        status, out = http("POST", f"{server}/invocations", body)
        assert status == 200, out
        got = np.asarray(out["predictions"], dtype=np.float32)
        np.testing.assert_allclose(got, pyfunc.predict(TEXTS, params=params), rtol=0, atol=1e-6)


def test_invocations_answer_sparse_and_colbert(server, pyfunc):
    status, out = http("POST", f"{server}/invocations", {"inputs": TEXTS, "params": {"output": "sparse"}})
    assert status == 200, out
    want = pyfunc.predict(TEXTS, params={"output": "sparse"})
    assert [set(row) for row in out["predictions"]] == [set(row) for row in want] and any(want)
    for got, ref in zip(out["predictions"], want):
        assert all(abs(got[t] - w) < 1e-6 for t, w in ref.items())
    status, out = http("POST", f"{server}/invocations",
                       {"inputs": TEXTS, "params": {"output": "colbert", "kind": "passage"}})
    assert status == 200, out
    for got, ref in zip(out["predictions"], pyfunc.predict(TEXTS, params={"output": "colbert", "kind": "passage"})):
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("body, message", [
    ({"inputs": []}, "non-empty list of strings"),
    ({"inputs": [1, 2]}, "item 0 is int"),
    ({"inputs": "one text"}, "wrap it in a list"),
    ({"inputs": [["a", "b"]]}, "array of shape [1, 2]"),
    ({"inputs": ["a"] * (MAX_PREDICT_TEXTS + 1)}, f"at most {MAX_PREDICT_TEXTS} texts"),
    ({"inputs": ["a"], "params": {"kind": "title"}}, "must be 'query' or 'passage'"),
    ({"inputs": ["a"], "params": {"output": "bm25"}}, "must be one of dense, sparse, colbert"),
])
def test_bad_input_is_a_400_with_the_reason(server, body, message):
    status, out = http("POST", f"{server}/invocations", body)
    assert status == 400, out
    assert message in out["message"] and out["error_code"] == "INVALID_PARAMETER_VALUE"


def test_malformed_json_is_a_400(server):
    status, out = http("POST", f"{server}/invocations", raw=b'{"inputs": [')
    assert status == 400 and "valid JSON" in out["message"]


def test_the_logged_model_carries_its_code_and_installable_pins(store, tmp_path):
    from importlib.metadata import version

    uri, _ = store
    local = Path(mlflow.artifacts.download_artifacts("models:/clp-ray-hi@champion", tracking_uri=uri))
    reqs = [Requirement(line) for line in (local / "requirements.txt").read_text().split() if line.strip()]
    assert "clp-ray" not in {r.name for r in reqs}
    for r in reqs:  # every pin names a distribution installed here, at the version installed here
        assert r.specifier and r.specifier.contains(version(r.name).split("+")[0]), r
    assert {"torch", "transformers", "mlflow"} <= {r.name for r in reqs}
    code = local / "code" / "clp_ray"
    assert (code / "tracking" / "pyfunc.py").is_file() and (code / "model" / "embedder.py").is_file()
    assert not (code / "assets").exists()
    # Loaded in a fresh process, the model's own copy of clp_ray is the one imported.
    script = ("import mlflow\n"
              f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
              "import clp_ray.tracking.pyfunc as p; print(p.__file__)\n"
              f"print(m.predict({TEXTS!r}).shape)\n")
    p = subprocess.run([sys.executable, "-c", script],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[0].startswith(str(code)) and "(3, 64)" in p.stdout
