from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """The first 40 bundled CLP records: with 2 workers x batch 4, a few micro-batches per epoch."""
    from pathlib import Path

    from clp_ray.config import resolve_path

    src = Path(resolve_path("pkg://ko_help/train.jsonl")).read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(src) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def ray_cli_env(monkeypatch):
    """Environment for the `ray` CLI, heads and drivers started from a test. They must agree on the
    auth mode (Ray 2.60 turns token auth on once ~/.ray/auth_token exists), and `ray`/`python` must be
    this environment's (as on a cluster node). Set in os.environ too, for helpers such as
    AutoscalingCluster that run `ray` from PATH. The token is made here if missing: `ray start`
    refuses token auth without one, and on a fresh machine nothing has made it yet."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120)
    return dict(os.environ)


@pytest.fixture(scope="session")
def tiny_path():
    from clp_ray.model.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture()
def tiny_embedder(tiny_path):
    from clp_ray.model.embedder import Embedder

    return Embedder.from_pretrained(tiny_path)


def make_encoder(kind: str, hidden: int, layers: int, intermediate: int, seed: int = 0):
    """A random BERT or XLM-R encoder built from a config (no hub)."""
    from transformers import AutoModel, BertConfig, XLMRobertaConfig

    cls = {"bert": BertConfig, "xlmr": XLMRobertaConfig}[kind]
    cfg = cls(vocab_size=300, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
              intermediate_size=intermediate, max_position_embeddings=64, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return AutoModel.from_config(cfg, add_pooling_layer=False)


def run_in_process(script: str, *args: str):
    """``python jobs/<script> ARGS`` inside the test process: the same ``run_job`` path (argument
    parsing, exit codes, one message on stderr) without ~8 s of imports per call. For calls that end
    before Ray starts — asserted when no earlier test left Ray running — and that need no
    environment read at import time (HF_*_OFFLINE); those stay subprocesses."""
    import contextlib
    import importlib.util
    import io
    import subprocess
    from pathlib import Path

    import ray

    from clp_ray.cli import run_job

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(f"_job_{Path(script).stem}", root / "jobs" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    ray_before = ray.is_initialized()  # e.g. a module-scoped Ray fixture of the calling test's file
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = run_job(module.main, module.parser().parse_args(list(args)))
            except SystemExit as e:  # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(cwd)
    started = ray.is_initialized() and not ray_before
    if started:
        ray.shutdown()
    assert not started, f"jobs/{script} {' '.join(args)} started Ray: run it as a subprocess"
    return subprocess.CompletedProcess([script, *args], rc, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------ HTTP servers started by tests


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, *, raw: bytes | None = None, timeout: float = 60, headers=None):
    """``(status, parsed JSON or text)`` of one request; HTTP errors are answers, not exceptions."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_until_up(url: str, proc=None, timeout: float = 180) -> None:
    """Poll ``url`` until it answers 200 (fail early if ``proc`` exits first)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")


def register_model(tracking_uri: str, folder, name: str = "clp-ray-hi", score: float = 0.5, *, promote: bool = True) -> str:
    """Log ``folder`` as a new version of ``name`` in the store at ``tracking_uri`` (tagged with
    ``score``; moved to @champion when ``promote``). Returns the version."""
    from clp_ray.config import load_config
    from clp_ray.tracking.registry import log_embedder_model, promote_if_better
    from clp_ray.tracking.runs import start_run

    cfg = load_config(name.rsplit("-", 1)[-1], "tiny", [f"tracking.tracking_uri={tracking_uri}"])
    tracker = start_run(cfg, "registered-by-test")
    mv = log_embedder_model(tracker, folder, registered_name=name, tags={"test_ndcg_at_10": score, "eval_set_hash": "h1"})
    tracker.end()
    if promote:
        assert promote_if_better(tracking_uri, name, mv.version).promoted
    return str(mv.version)


def perturbed_moe_folder(path, out, seed: int = 0, layers=(0, -1)):
    """The model at ``path`` upcycled (3 experts) with distinct experts and a random router, saved
    to ``out``: an MoE model whose output differs from the dense one."""
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.moe import moe_layers

    emb = Embedder.from_pretrained(path)
    emb.upcycle(list(layers), num_experts=3, top_k=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in moe_layers(emb.encoder):
            m.router.weight.normal_(generator=gen)
            for ex in m.experts:
                ex.weight.add_(torch.randn(ex.weight.shape, generator=gen) * 0.1)
    return emb.save_pretrained(out)
