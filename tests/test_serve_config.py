"""The Serve app's configuration without starting it: the config file `serve run` reads, the app
builder, and the request contract's validation."""

from pathlib import Path

import pytest
import yaml

from clp_ray.serving.app import ServeSettings, build_app
from clp_ray.serving.openai_api import ApiError, RequestLimits, parse_request

ROOT = Path(__file__).resolve().parents[1]
LIMITS = RequestLimits(max_inputs=4, max_chars=40, max_bytes=2048)


def test_the_serve_config_file_is_valid_for_ray_and_builds_the_app(monkeypatch, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    cfg = yaml.safe_load((ROOT / "configs/serve/serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    (app_cfg,) = schema.applications
    assert app_cfg.import_path == "clp_ray.serving.app:build_app"
    deployment = build_app(app_cfg.args)._bound_deployment
    settings = deployment.init_args[0]
    assert isinstance(settings, ServeSettings) and settings.models == {"hi": "clp-ray-hi", "ko": "clp-ray-ko"}
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'm.db'}" and settings.alias == "champion"
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_the_cluster_profile_serves_on_gpus_with_replicas_from_the_config(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("CLP_RAY_API_KEYS", "sk-a,sk-b")
    d = build_app({"langs": "hi,ko,fa", "profile": "cluster", "alias": "staging",
                   "set": ["serve.num_replicas=3"]})._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_gpus"] == 1.0
    s = d.init_args[0]
    assert s.use_gpu and s.alias == "staging" and s.max_models_per_replica == 6  # old + new per language
    assert s.lang_of("clp-ray-fa") == "fa" and s.lang_of("ko") == "ko" and s.lang_of("clp-ray-de") is None
    assert s.api_keys.required and len(s.api_keys.digests) == 2 and "sk-a" not in repr(s)
    assert d.max_queued_requests == 256  # a bounded queue: 503 + Retry-After beyond it
    assert d.backpressure_config.retry_after_s == 1.0


def test_the_cluster_profile_refuses_to_start_without_keys(monkeypatch, tmp_path):
    from clp_ray.errors import ConfigError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.delenv("CLP_RAY_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match=r"require_api_keys is true.*\$CLP_RAY_API_KEYS or serve.api_keys_file"):
        build_app({"langs": "hi", "profile": "cluster"})
    # any non-loopback host needs keys unless the user says otherwise
    with pytest.raises(ConfigError, match="0.0.0.0 is reachable from other machines"):
        build_app({"langs": "hi", "set": ["serve.host=0.0.0.0"]})
    open_app = build_app({"langs": "hi", "set": ["serve.host=0.0.0.0", "serve.require_api_keys=false"]})
    assert not open_app._bound_deployment.init_args[0].api_keys.required


def test_the_serve_job_without_keys_on_the_cluster_profile_exits_2_before_ray_starts(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CLP_RAY_API_KEYS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'm.db'}"
    r = subprocess.run([sys.executable, str(ROOT / "jobs/serve.py"), "--lang", "hi", "--profile", "cluster"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "needs API keys" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_api_keys_from_the_environment_and_a_file_and_the_401s(tmp_path):
    from clp_ray.config import load_config
    from clp_ray.serving.auth import api_keys_for, describe, read_keys

    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nsk-file-1\n\nsk-file-2  # rotated 2026-12\n")
    assert read_keys("K", str(f), {"K": "sk-env-1, sk-env-2\nsk-env-3"}) == [
        "sk-env-1", "sk-env-2", "sk-env-3", "sk-file-1", "sk-file-2"]
    cfg = load_config("hi", "local", [f"serve.api_keys_file={f}"]).serve
    keys = api_keys_for(cfg, environ={})
    assert keys.required and "2 accepted" in describe(keys, cfg) and "sk-file" not in repr(keys)
    keys.check("Bearer sk-file-2")
    keys.check("bearer  sk-file-1 ")
    for header, message in ((None, "didn't provide an API key"), ("Bearer", "didn't provide"),
                            ("Basic c2stZmlsZS0x", "didn't provide"), ("Bearer sk-file-3", "Incorrect API key")):
        with pytest.raises(ApiError) as e:
            keys.check(header)
        body = e.value.body["error"]
        assert e.value.status == 401 and message in body["message"] and body["code"] == "invalid_api_key"
        assert "sk-file" not in body["message"]  # never echoed
    with pytest.raises(Exception, match=r"api_keys_file: cannot read .*missing"):
        api_keys_for(load_config("hi", "local", [f"serve.api_keys_file={tmp_path / 'missing'}"]).serve, environ={})
    local = load_config("hi", "local").serve
    open_keys = api_keys_for(local, environ={})
    open_keys.check(None)  # the local default: open on 127.0.0.1, and the start-up line says so
    assert "open to anyone who can reach 127.0.0.1:8000" in describe(open_keys, local)


@pytest.mark.parametrize("raw, status, message", [
    (b'{"model": "hi", "input": ["a", "b", "c", "d", "e"]}', 400, "at most 4 texts per request (serve.max_inputs_per_request)"),
    (b'{"model": "hi", "input": ["' + b"x" * 41 + b'"]}', 413, "41 characters in all; this service takes at most 40"),
    (b'{"model": "hi", "input": ["' + b"x" * 3000 + b'"]}', 413, "3030 bytes; this service takes at most 2048"),
])
def test_request_limits_name_the_limit(raw, status, message):
    with pytest.raises(ApiError) as e:
        parse_request(raw, LIMITS)
    assert e.value.status == status and message in e.value.body["error"]["message"], e.value.body


def test_model_names_a_served_alias_a_version_or_another_alias():
    from clp_ray.serving.openai_api import ModelRef, parse_model

    assert parse_model("clp-ray-hi") == ModelRef("clp-ray-hi")
    assert parse_model("hi/12") == ModelRef("hi", version="12")
    assert parse_model("clp-ray-hi@challenger") == ModelRef("clp-ray-hi", alias="challenger")
    for bad in ("clp-ray-hi/0", "clp-ray-hi/x", "a/b/c", "hi@", "hi@a b"):
        with pytest.raises(ApiError, match="not a model name"):
            parse_model(bad)


def test_pinned_versions_resolve_through_the_registry_and_a_404_lists_what_exists(tmp_path):
    from mlflow import MlflowClient

    from clp_ray.serving.openai_api import ModelRef
    from clp_ray.serving.versions import RegistryView

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    c.create_registered_model("clp-ray-hi")
    for _ in range(2):
        c.create_model_version("clp-ray-hi", source=str(tmp_path), run_id=None)
    c.set_registered_model_alias("clp-ray-hi", "champion", "1")
    c.set_registered_model_alias("clp-ray-hi", "challenger", "2")
    view = RegistryView(uri, ttl_s=3600)
    assert view.version_for("clp-ray-hi", ModelRef("clp-ray-hi", version="2")) == "2"
    assert view.version_for("clp-ray-hi", ModelRef("clp-ray-hi", alias="challenger")) == "2"
    c.create_model_version("clp-ray-hi", source=str(tmp_path), run_id=None)  # registered after the cache
    assert view.version_for("clp-ray-hi", ModelRef("clp-ray-hi", version="3")) == "3"
    c.set_registered_model_alias("clp-ray-hi", "challenger", "3")
    assert view.version_for("clp-ray-hi", ModelRef("clp-ray-hi", alias="challenger")) == "2"  # cached within ttl
    for ref, what in ((ModelRef("clp-ray-hi", version="9"), "version 9"), (ModelRef("clp-ray-hi", alias="staging"),
                                                                         "alias @staging")):
        with pytest.raises(ApiError) as e:
            view.version_for("clp-ray-hi", ref)
        assert e.value.status == 404 and e.value.body["error"]["message"] == (
            f"clp-ray-hi has no {what}: clp-ray-hi has versions 1, 2, 3 (aliases @challenger -> 3, @champion -> 1)")


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "not valid JSON"),
    (b'["a"]', "body: Input should be a valid dictionary"),
    (b'{"model": "hi"}', "input: Field required"),
    (b'{"model": "hi", "input": [""]}', "must not be empty strings"),
    (b'{"model": "hi", "input": ["a", null]}', "input[1]: expected a string, got NoneType"),
    (b'{"model": "hi", "input": "a", "encoding_format": "binary"}', "encoding_format"),
    (b'{"model": "hi", "input": "a", "encoding_format": "base64", "output": "sparse"}', "base64 encodes dense vectors"),
    (b'{"model": "hi", "input": "a", "dimensions": 0}', "dimensions"),
])
def test_bad_requests_are_400s_that_say_what_is_wrong(raw, message):
    with pytest.raises(ApiError) as e:
        parse_request(raw, LIMITS)
    assert e.value.status == 400 and message in e.value.body["error"]["message"]


def test_base64_is_openais_little_endian_float32():
    import base64

    import numpy as np

    from clp_ray.serving.openai_api import encode_base64

    v = np.array([0.5, -1.25, 3.0e-8, 1.0], dtype=np.float32)
    raw = base64.b64decode(encode_base64(v.tolist()))
    assert raw == v.astype("<f4").tobytes() and np.array_equal(np.frombuffer(raw, dtype="<f4"), v)
    req = parse_request(b'{"model": "hi", "input": ["a"], "encoding_format": "base64", "dimensions": 32}', LIMITS)
    assert req.encoding_format == "base64" and req.dimensions == 32


def test_a_good_request_keeps_its_texts_in_order():
    req = parse_request(b'{"model": "clp-ray-hi", "input": ["b", "a"], "input_type": "passage", "user": "u1"}', LIMITS)
    assert req.texts() == ["b", "a"] and req.input_type == "passage"
    assert parse_request(b'{"model": "hi", "input": "one"}', LIMITS).texts() == ["one"]
