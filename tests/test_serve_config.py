"""The Serve app's configuration without starting it: the config file `serve run` reads, the app
builder, and the request contract's validation."""

from pathlib import Path

import pytest
import yaml

from clp_ray.serving.app import ServeSettings, build_app
from clp_ray.serving.openai_api import ApiError, parse_request

ROOT = Path(__file__).resolve().parents[1]


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
    d = build_app({"langs": "hi,ko,fa", "profile": "cluster", "alias": "staging",
                   "set": ["serve.num_replicas=3"]})._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_gpus"] == 1.0
    s = d.init_args[0]
    assert s.use_gpu and s.alias == "staging" and s.max_models_per_replica == 6  # old + new per language
    assert s.lang_of("clp-ray-fa") == "fa" and s.lang_of("ko") == "ko" and s.lang_of("clp-ray-de") is None


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
        parse_request(raw, max_inputs=4)
    assert e.value.status == 400 and message in e.value.body["error"]["message"]


def test_base64_is_openais_little_endian_float32():
    import base64

    import numpy as np

    from clp_ray.serving.openai_api import encode_base64

    v = np.array([0.5, -1.25, 3.0e-8, 1.0], dtype=np.float32)
    raw = base64.b64decode(encode_base64(v.tolist()))
    assert raw == v.astype("<f4").tobytes() and np.array_equal(np.frombuffer(raw, dtype="<f4"), v)
    req = parse_request(b'{"model": "hi", "input": ["a"], "encoding_format": "base64", "dimensions": 32}', 4)
    assert req.encoding_format == "base64" and req.dimensions == 32


def test_a_good_request_keeps_its_texts_in_order():
    req = parse_request(b'{"model": "clp-ray-hi", "input": ["b", "a"], "input_type": "passage", "user": "u1"}', 4)
    assert req.texts() == ["b", "a"] and req.input_type == "passage"
    assert parse_request(b'{"model": "hi", "input": "one"}', 4).texts() == ["one"]
