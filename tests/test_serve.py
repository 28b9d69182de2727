"""The Ray Serve app (jobs/serve.py) over real HTTP on 127.0.0.1: per-language embeddings, concurrent
clients, the alias moving to a new version while requests run (and pinned versions staying put), API
keys, limits, the bounded queue, and the error answers."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, http, perturbed_moe_folder, register_model

from clp_ray.model.embedder import Embedder

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 1.0
KEY = "sk-clp-test-7f3a9c"  # the keyed service's accepted key; it must never show up in a log
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = [f"{w} {i}" for i, w in enumerate(["셀 보호 해제", "Insert rows above", "차트 데이터 범위", "पासवर्ड बदलें"] * 4)]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_path):
    """hi v1 (dense), ko v1 (MoE with BGE-M3's heads), hi v2 (another MoE, registered but not promoted)."""
    from clp_ray.config import TinyModelConfig
    from clp_ray.model.tiny import tiny_model_path

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    folders = {"hi/1": Embedder.from_pretrained(tiny_path).save_pretrained(root / "hi1"),
               "ko/1": perturbed_moe_folder(tiny_model_path(TinyModelConfig(m3_heads=True)), root / "ko1", seed=1),
               "hi/2": perturbed_moe_folder(tiny_path, root / "hi2", seed=2)}
    register_model(uri, folders["hi/1"], "clp-ray-hi", 0.5)
    register_model(uri, folders["ko/1"], "clp-ray-ko", 0.5)
    assert register_model(uri, folders["hi/2"], "clp-ray-hi", 0.6, promote=False) == "2"
    from mlflow import MlflowClient

    MlflowClient(uri).set_registered_model_alias("clp-ray-hi", "challenger", "2")
    expected = {}
    for key, folder in folders.items():
        emb = Embedder.from_pretrained(folder)
        expected[key] = {kind: dict(zip(TEXTS, emb.encode(TEXTS, kind=kind).numpy())) for kind in ("query", "passage")}
    return uri, root, expected


@contextlib.contextmanager
def serve_job(folder: Path, uri: str, args: list[str], api_keys: str | None):
    """``jobs/serve.py`` on the tiny profile in ``folder``: yields (url, summary) once it is ready;
    on exit SIGINT (the job shuts Serve and Ray down) and its exit status must be 0."""
    port, summary, log_path = free_port(), folder / "serve.json", folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "CLP_RAY_API_KEYS"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    if api_keys:
        env["CLP_RAY_API_KEYS"] = api_keys
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs/serve.py"), *args, "--profile", "tiny",
                                 "--port", str(port), "--set", f"tracking.tracking_uri={uri}", "--summary", str(summary)],
                                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not summary.exists():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}", json.loads(summary.read_text())
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    assert rc == 0, log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def service(models):
    uri, root, _ = models
    with serve_job(root, uri, ["--langs", "hi,ko", "--set", f"serve.poll_interval_s={POLL_S}"],
                   api_keys=f"sk-other-key,{KEY}") as running:
        yield running


def embed(url, model, texts, kind="query"):
    return http("POST", f"{url}/v1/embeddings", {"model": model, "input": texts, "input_type": kind}, headers=AUTH)


def test_ready_with_every_language_and_its_version(service):
    url, summary = service
    assert summary["ready"] and summary["readyz"]["serving"] == {"clp-ray-hi": "1", "clp-ray-ko": "1"}
    assert http("GET", f"{url}/healthz") == (200, {"status": "ok"})  # probes need no key
    assert summary["auth"] == "api_keys"
    status, body = http("GET", f"{url}/v1/models", headers=AUTH)
    assert status == 200 and {m["id"]: m["version"] for m in body["data"]} == {
        "clp-ray-hi": "1", "clp-ray-ko": "1", "clp-ray-hi/1": "1", "clp-ray-hi/2": "2", "clp-ray-ko/1": "1"}
    assert next(m for m in body["data"] if m["id"] == "clp-ray-hi/2")["aliases"] == ["challenger"]


def test_each_language_gets_its_own_models_embeddings(service, models):
    url, _ = service
    expected = models[2]
    for lang in ("hi", "ko"):
        for kind in ("query", "passage"):
            status, body = embed(url, f"clp-ray-{lang}", TEXTS[:5], kind)
            assert status == 200, body
            assert body["model"] == f"clp-ray-{lang}/1" and [d["index"] for d in body["data"]] == list(range(5))
            got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
            want = np.stack([expected[f"{lang}/1"][kind][t] for t in TEXTS[:5]])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            assert body["usage"]["prompt_tokens"] > 5
    # a bare string, and the language code as the model name
    status, body = embed(url, "hi", TEXTS[0])
    assert status == 200 and len(body["data"]) == 1 and body["model"] == "clp-ray-hi/1"
    assert np.abs(np.array(expected["ko/1"]["query"][TEXTS[0]]) - expected["hi/1"]["query"][TEXTS[0]]).max() > 1e-3


def test_32_concurrent_clients_get_correct_answers(service, models):
    url, _ = service
    expected = models[2]

    def client(i):
        answers = []
        for r in range(3):
            lang = ("hi", "ko")[(i + r) % 2]
            texts = TEXTS[(i + r) % 8:(i + r) % 8 + 1 + i % 4]
            status, body = embed(url, f"clp-ray-{lang}", texts)
            got = np.array([d["embedding"] for d in body["data"]]) if status == 200 else None
            answers.append((status, lang, texts, got))
        return answers

    with ThreadPoolExecutor(32) as pool:
        results = [a for answers in pool.map(client, range(32)) for a in answers]
    assert len(results) == 96 and all(status == 200 for status, *_ in results)
    for _, lang, texts, got in results:
        np.testing.assert_allclose(got, np.stack([expected[f"{lang}/1"]["query"][t] for t in texts]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("body, status, message", [
    ({"model": "clp-ray-fr", "input": ["a"]}, 404, "serves clp-ray-hi, clp-ray-ko"),
    ({"model": "clp-ray-hi/9", "input": ["a"]}, 404, "clp-ray-hi has no version 9: clp-ray-hi has versions 1, 2"),
    ({"model": "hi@staging", "input": ["a"]}, 404, "no alias @staging"),
    ({"model": "clp-ray-hi", "input": ["x" * 1_000_001]}, 413, "this service takes at most 1000000 per request"),
    ({"model": "clp-ray-hi", "input": []}, 400, "at least one text"),
    ({"model": "clp-ray-hi", "input": ["a", 3]}, 400, "input[1]: expected a string, got int"),
    ({"model": "clp-ray-hi", "input": ["a"], "input_type": "title"}, 400, "input_type"),
    ({"model": "clp-ray-hi", "input": ["a"] * 257}, 400, "at most 256 texts"),
    ({"input": ["a"]}, 400, "model: Field required"),
])
def test_bad_requests_get_the_reason(service, body, status, message):
    got_status, got = http("POST", f"{service[0]}/v1/embeddings", body, headers=AUTH)
    assert got_status == status and message in got["error"]["message"], got


def test_the_official_openai_client_with_its_default_arguments(service, models):
    """``openai.OpenAI(base_url=..., api_key=...)`` as LangChain and vector stores use it: the client
    asks for base64 unless told otherwise; sync and async, a single input, user, dimensions, errors."""
    import asyncio

    import openai

    url, _ = service
    expected = models[2]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    res = client.embeddings.create(model="clp-ray-hi", input=TEXTS[:3])
    got = np.array([d.embedding for d in res.data], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([expected["hi/1"]["query"][t] for t in TEXTS[:3]]), rtol=0, atol=1e-5)
    assert res.model == "clp-ray-hi/1" and res.usage.prompt_tokens > 3 and [d.index for d in res.data] == [0, 1, 2]
    one = client.embeddings.create(model="clp-ray-ko", input=TEXTS[0], encoding_format="float", user="u1",
                                   dimensions=got.shape[1])  # its own dimension: accepted
    np.testing.assert_allclose(one.data[0].embedding, expected["ko/1"]["query"][TEXTS[0]], rtol=0, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="not trained for shortened") as e:
        client.embeddings.create(model="clp-ray-hi", input=["a"], dimensions=8)
    assert e.value.status_code == 400 and e.value.body["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError, match="serves clp-ray-hi"):
        client.embeddings.create(model="clp-ray-fr", input=["a"])

    async def embed_async():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY) as aclient:
            return await aclient.embeddings.create(model="clp-ray-hi", input=TEXTS[3:5])

    ares = asyncio.run(embed_async())
    np.testing.assert_allclose(np.array([d.embedding for d in ares.data], dtype=np.float32),
                               np.stack([expected["hi/1"]["query"][t] for t in TEXTS[3:5]]), rtol=0, atol=1e-5)
    assert {"clp-ray-hi", "clp-ray-ko", "clp-ray-hi/2"} <= {m.id for m in client.models.list()}
    pinned = client.embeddings.create(model="clp-ray-hi@challenger", input=TEXTS[:2])
    assert pinned.model == "clp-ray-hi/2"
    np.testing.assert_allclose(np.array([d.embedding for d in pinned.data], dtype=np.float32),
                               np.stack([expected["hi/2"]["query"][t] for t in TEXTS[:2]]), rtol=0, atol=1e-5)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key") as e:
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).embeddings.create(
            model="clp-ray-hi", input=["a"])
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


def test_a_keyed_server_answers_401_without_a_valid_key_and_never_logs_the_key(service, models):
    url, summary = service
    for headers in ({}, {"Authorization": "Bearer sk-nope"}, {"Authorization": KEY}):
        for method, path, body in (("POST", "/v1/embeddings", {"model": "clp-ray-hi", "input": ["a"]}),
                                   ("GET", "/v1/models", None), ("GET", "/stats", None)):
            status, got = http(method, f"{url}{path}", body, headers=headers)
            assert status == 401 and got["error"]["code"] == "invalid_api_key", (path, headers, got)
    assert http("GET", f"{url}/readyz")[0] == 200
    status, stats = http("GET", f"{url}/stats", headers=AUTH)
    assert status == 200 and KEY not in json.dumps(stats)
    logs = [models[1] / "serve.log", models[1] / "serve.json", *_ray_session_logs()]
    leaked = [p for p in logs if p.is_file() and KEY in p.read_text(errors="replace")]
    assert logs and not leaked, leaked


def _ray_session_logs() -> list:
    """Every file under the newest Ray session's logs (the job's local Ray)."""
    import tempfile

    root = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "session_latest" / "logs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_sparse_and_colbert_outputs_where_the_model_has_the_heads(service, models):
    url, root = service[0], models[1]
    emb = Embedder.from_pretrained(root / "ko1")
    status, body = http("POST", f"{url}/v1/embeddings", {"model": "clp-ray-ko", "input": TEXTS[:3], "output": "sparse"},
                        headers=AUTH)
    assert status == 200, body
    for got, want in zip(body["data"], emb.encode(TEXTS[:3], kind="query", output="sparse")):
        assert {int(t) for t in got["embedding"]} == set(want)
        assert all(abs(got["embedding"][str(t)] - w) < 1e-5 for t, w in want.items())
    status, body = http("POST", f"{url}/v1/embeddings",
                        {"model": "clp-ray-ko", "input": TEXTS[:3], "output": "colbert", "input_type": "passage"},
                        headers=AUTH)
    assert status == 200, body
    for got, want in zip(body["data"], emb.encode(TEXTS[:3], kind="passage", output="colbert")):
        np.testing.assert_allclose(np.asarray(got["embedding"], dtype=np.float32), want.numpy(), rtol=0, atol=1e-5)
    status, body = http("POST", f"{url}/v1/embeddings", {"model": "clp-ray-hi", "input": ["a"], "output": "sparse"},
                        headers=AUTH)
    assert status == 400 and "has no sparse head" in body["error"]["message"] and body["error"]["param"] == "output"


def test_malformed_json_is_a_400(service):
    status, body = http("POST", f"{service[0]}/v1/embeddings", raw=b'{"model": "clp-ray-hi", "input": [', headers=AUTH)
    assert status == 400 and body["error"]["code"] == "invalid_json"


def test_moving_the_alias_switches_the_model_without_failing_a_request(service, models):
    """Clients of the alias move to the new version without a failed request; a client that pinned
    ``clp-ray-hi/1`` keeps version 1's vectors throughout."""
    from mlflow import MlflowClient

    url, _ = service
    uri, _, expected = models
    answers, pinned, stop = [], [], threading.Event()

    def client(model, into):
        deadline = time.monotonic() + 120  # bounded: stops by itself
        while not stop.is_set() and time.monotonic() < deadline:
            status, body = embed(url, model, TEXTS[:3])
            into.append((time.monotonic(), status, body))

    threads = [threading.Thread(target=client, args=("clp-ray-hi", answers)) for _ in range(4)]
    threads.append(threading.Thread(target=client, args=("clp-ray-hi/1", pinned)))
    for t in threads:
        t.start()
    time.sleep(1.0)
    moved_at = time.monotonic()
    MlflowClient(uri).set_registered_model_alias("clp-ray-hi", "champion", "2")
    deadline = moved_at + 60
    while time.monotonic() < deadline and not any(b.get("data") and a > moved_at and b.get("model") == "clp-ray-hi/2"
                                                  and _version(b, expected) == "2" for a, _, b in answers[-8:]):
        time.sleep(0.2)
    time.sleep(1.0)  # a few answers from the new model
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert answers and all(status == 200 for _, status, _ in answers), [b for _, s, b in answers if s != 200][:3]
    versions = [(t, _version(b, expected)) for t, _, b in answers]
    assert all(v in ("1", "2") for _, v in versions)  # every answer is one model's, never a mix
    first_new = min(t for t, v in versions if v == "2")
    assert all(v == "2" for t, v in versions if t > first_new + 0.5)  # once switched, it stays switched
    switch_s = first_new - moved_at
    assert switch_s < POLL_S + 15, f"switched after {switch_s:.1f} s"  # one poll + loading the new version
    assert all(b["model"] == f"clp-ray-hi/{_version(b, expected)}" for _, _, b in answers)  # the answer names it
    status, body = http("GET", f"{url}/readyz")
    assert status == 200 and body["serving"]["clp-ray-hi"] == "2"
    assert any(t > first_new for t, *_ in pinned) and all(s == 200 for _, s, _ in pinned)
    assert all(_version(b, expected) == "1" and b["model"] == "clp-ray-hi/1" for _, _, b in pinned)


def _version(body, expected) -> str:
    """Which registered hi version produced the answer (by its embeddings)."""
    got = np.array([d["embedding"] for d in body["data"]])
    for v in ("1", "2"):
        if np.abs(got - np.stack([expected[f"hi/{v}"]["query"][t] for t in TEXTS[:3]])).max() < 1e-5:
            return v
    return "neither"


def test_an_open_local_server_says_so_and_a_full_queue_is_a_503_with_retry_after(models, tmp_path):
    """No keys on 127.0.0.1: open, and the start-up log says so. One request at a time per replica
    and one queued: the rest of a burst is refused at once (503, Retry-After) instead of queueing."""
    uri, _, expected = models
    args = ["--lang", "hi", "--set", "serve.num_replicas=1", "--set", "serve.max_ongoing_requests=1",
            "--set", "serve.max_queued_requests=1", "--set", "serve.retry_after_s=2", "--set", "serve.max_batch_size=1"]
    with serve_job(tmp_path, uri, args, api_keys=None) as (url, summary):
        assert summary["auth"] == "open"
        assert "no API keys: the endpoint is open to anyone who can reach 127.0.0.1" in (tmp_path / "serve.log").read_text()
        texts = TEXTS * 8  # 128 texts: long enough a request that a burst of 12 overlaps
        # (version 1 pinned: an earlier test may have moved @champion)

        def one(_):
            req = urllib.request.Request(f"{url}/v1/embeddings", json.dumps({"model": "clp-ray-hi/1", "input": texts}).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    return r.status, dict(r.headers), json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read().decode(errors="replace")

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        ok = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] != 200]
        assert ok and refused and all(r[0] == 503 for r in refused), [(r[0], str(r[2])[:200]) for r in results]
        assert all(r[1].get("retry-after", r[1].get("Retry-After")) == "2" for r in refused)
        want = np.stack([expected["hi/1"]["query"][t] for t in texts])
        for _, _, body in ok:
            np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), want, rtol=0, atol=1e-5)
