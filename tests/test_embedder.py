import json

import pytest
import torch
import torch.nn.functional as F

from clp_ray.config import ModelConfig, MoEConfig, TinyModelConfig
from clp_ray.model.embedder import Embedder
from clp_ray.model.source import load_embedder
from clp_ray.model.tiny import tiny_model_path

TEXTS = ["셀 보호 해제", "Insert rows above", "페이지 번호 삽입하기", "a much longer passage " * 20]


def test_encode_shape_norm_order_and_mode(tiny_embedder):
    emb = tiny_embedder.train()
    out = emb.encode(TEXTS, batch_size=2)
    assert out.shape == (4, emb.dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    assert emb.training  # encode restores the previous mode
    # Batching/sorting must not change results or order.
    one_by_one = torch.cat([emb.encode([t]) for t in TEXTS])
    torch.testing.assert_close(out, one_by_one, rtol=0, atol=1e-5)
    assert not out.requires_grad
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        emb.encode(TEXTS, batch_size=0)


def test_training_forward_has_gradients(tiny_embedder):
    enc = tiny_embedder.tokenize(TEXTS[:2], max_length=16)
    e = tiny_embedder(**enc)
    assert e.shape == (2, tiny_embedder.dim) and e.requires_grad


def test_cls_and_mean_pooling_by_hand(tiny_embedder):
    enc = tiny_embedder.tokenize(TEXTS[:3], max_length=32)
    hidden = tiny_embedder.encoder(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    tiny_embedder.pooling = "cls"
    torch.testing.assert_close(tiny_embedder(**enc), F.normalize(hidden[:, 0], dim=-1))
    tiny_embedder.pooling = "mean"
    torch.testing.assert_close(tiny_embedder(**enc), F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))
    tiny_embedder.normalize = False
    torch.testing.assert_close(tiny_embedder(**enc), (hidden * m).sum(1) / m.sum(1))


def test_encode_rejects_non_string_input(tiny_embedder):
    with pytest.raises(TypeError, match="list of strings"):
        tiny_embedder.encode("just one string")
    with pytest.raises(TypeError, match="list of strings"):
        tiny_embedder.encode(["ok", 3])


def test_settings_round_trip_and_overrides(tiny_embedder, tmp_path):
    tiny_embedder.pooling = "mean"
    tiny_embedder.query_max_len = 17
    tiny_embedder.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "clp_ray.json").read_text())
    assert meta["pooling"] == "mean" and meta["moe"] is None
    loaded = Embedder.from_pretrained(tmp_path / "m")
    assert loaded.pooling == "mean" and loaded.query_max_len == 17
    assert Embedder.from_pretrained(tmp_path / "m", pooling="cls").pooling == "cls"
    torch.testing.assert_close(loaded.encode(TEXTS), tiny_embedder.encode(TEXTS), rtol=0, atol=1e-6)


def test_dense_folder_loads_in_plain_transformers(tiny_embedder, tmp_path):
    from transformers import AutoModel

    tiny_embedder.save_pretrained(tmp_path / "m")
    plain = AutoModel.from_pretrained(tmp_path / "m", add_pooling_layer=False)
    enc = tiny_embedder.tokenize(TEXTS[:2])
    torch.testing.assert_close(plain(**enc).last_hidden_state[:, 0], tiny_embedder.encoder(**enc).last_hidden_state[:, 0])


def test_load_embedder_from_config_upcycles(tiny_path):
    emb = load_embedder(ModelConfig(name_or_path="tiny"), MoEConfig(layers=[0, -1], num_experts=4, top_k=2))
    assert emb.moe_spec.layers == [0, 3] and emb.moe_spec.num_experts == 4
    dense = load_embedder(ModelConfig(name_or_path="tiny"), MoEConfig(enabled=False))
    assert dense.moe_spec is None
    torch.testing.assert_close(emb.encode(TEXTS), dense.encode(TEXTS), rtol=0, atol=1e-5)


def test_tiny_model_is_deterministic_and_cached(tmp_path, monkeypatch):
    spec = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=1000, seed=5)
    monkeypatch.setenv("CLP_RAY_CACHE", str(tmp_path / "a"))
    a = tiny_model_path(spec)
    assert tiny_model_path(spec) == a  # second call reuses the cache
    monkeypatch.setenv("CLP_RAY_CACHE", str(tmp_path / "b"))
    b = tiny_model_path(spec)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    ea, eb = Embedder.from_pretrained(a), Embedder.from_pretrained(b)
    for (n, p), (_, q) in zip(ea.named_parameters(), eb.named_parameters()):
        assert torch.equal(p, q), n
    assert ea.encoder.config.hidden_size == 32 and ea.encoder.config.num_hidden_layers == 2
    ids = ea.tokenizer("셀 보호")["input_ids"]
    assert ids[0] == ea.tokenizer.cls_token_id and ids[-1] == ea.tokenizer.sep_token_id


def test_absolute_model_ref(tiny_path, tmp_path, monkeypatch):
    import shutil

    from clp_ray.errors import ClpRayError
    from clp_ray.model.source import absolute_model_ref

    shutil.copytree(tiny_path, tmp_path / "m")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    for ref in ("tiny", "BAAI/bge-m3", "models:/clp-ray-hi@champion", "runs:/abc/model"):
        assert absolute_model_ref(ref) == ref  # not folders: left to their loaders
    assert absolute_model_ref("m") == absolute_model_ref("./m") == str(tmp_path / "m")
    with pytest.raises(ClpRayError, match=r"model folder \./missing not found"):
        absolute_model_ref("./missing")
    with pytest.raises(ClpRayError, match="empty is not a model folder: it has no config.json"):
        absolute_model_ref("empty")


def test_module_level_upcycle_is_saved_and_restored(tiny_embedder, tmp_path):
    """An encoder upcycled behind the Embedder's back (clp_ray.model.moe.upcycle) saves its MoE layout:
    it used to write moe: null, and the reload got a freshly random FFN Linear."""
    from clp_ray.model.moe import moe_layers, upcycle

    upcycle(tiny_embedder.encoder, [-1], num_experts=2, top_k=1, balance_coef=0.02)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, m in moe_layers(tiny_embedder.encoder):
            for ex in m.experts:
                ex.weight.add_(torch.randn_like(ex.weight) * 0.1)
    before = tiny_embedder.encode(TEXTS)
    tiny_embedder.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "clp_ray.json").read_text())
    assert meta["moe"]["layers"] == [3] and meta["moe"]["num_experts"] == 2 and meta["moe"]["balance_coef"] == 0.02
    loaded = Embedder.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.encode(TEXTS), before, rtol=0, atol=1e-6)


def test_weights_that_do_not_match_the_model_fail_naming_them(tiny_embedder, tmp_path):
    from safetensors.torch import load_file, save_file

    from clp_ray.errors import ClpRayError
    from clp_ray.model.moe import upcycle

    dense = tiny_embedder.save_pretrained(tmp_path / "dense")
    weights = dense / "model.safetensors"
    state = load_file(str(weights))
    del state["encoder.layer.0.intermediate.dense.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ClpRayError, match=r"1 missing \(encoder\.layer\.0\.intermediate\.dense\.weight\).*at random"):
        Embedder.from_pretrained(dense)
    # MoE weights under a clp_ray.json that describes no MoE layers (what the old save wrote).
    upcycle(tiny_embedder.encoder, [-1], num_experts=2)
    moe = tiny_embedder.save_pretrained(tmp_path / "moe")
    meta = json.loads((moe / "clp_ray.json").read_text())
    (moe / "clp_ray.json").write_text(json.dumps({**meta, "moe": None}))
    with pytest.raises(ClpRayError, match=r"unexpected \(encoder\.layer\.3\.intermediate\.dense\.experts.*describes none"):
        Embedder.from_pretrained(moe)


def test_prefixes_and_kind_lengths_in_encode(tiny_embedder):
    tiny_embedder.query_prefix, tiny_embedder.passage_prefix = "query: ", "passage: "
    tiny_embedder.query_max_len = 8
    q = tiny_embedder.encode(TEXTS, kind="query")
    p = tiny_embedder.encode(TEXTS, kind="passage")
    plain = tiny_embedder.encode(["query: " + t for t in TEXTS], max_length=8)
    torch.testing.assert_close(q, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(p, tiny_embedder.encode(["passage: " + t for t in TEXTS]), rtol=0, atol=1e-6)
    assert not torch.allclose(q, tiny_embedder.encode(TEXTS, max_length=8), atol=1e-3)
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny_embedder.encode(TEXTS, kind="document")


def test_the_six_settings_are_views_of_one_embed_settings(tiny_embedder):
    from dataclasses import replace

    before = tiny_embedder.settings
    tiny_embedder.query_prefix = "query: "
    assert tiny_embedder.settings == replace(before, query_prefix="query: ")
    assert tiny_embedder.query_prefix == tiny_embedder.settings.prefix("query") == "query: "
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean', got 'max'"):
        tiny_embedder.pooling = "max"
    assert tiny_embedder.settings.pooling == before.pooling  # a refused value leaves the settings as they were
