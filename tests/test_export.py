"""jobs/export.py: sentence-transformers folders and ONNX graphs that embed as Embedder.encode does."""

import json

import numpy as np
import pytest
from conftest import perturbed_moe_folder, register_model, run_in_process

from clp_ray.model.embedder import Embedder

# Other texts than the export's own probes; a batch of one, and a text truncated at the max length.
TEXTS = ["행 삽입", "Protect a sheet with a password", "数据透视表 " * 60]
pytestmark = pytest.mark.slow


def onnx_embed(folder, texts, kind):
    import onnxruntime as ort

    meta = json.loads((folder / "clp_ray.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prefix = meta[f"{kind}_prefix"]
    enc = tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=meta[f"{kind}_max_len"],
                    return_tensors="np", return_token_type_ids=False)
    session = ort.InferenceSession(str(folder / meta["onnx"]["file"]), providers=["CPUExecutionProvider"])
    return session.run([meta["onnx"]["output"]], {"input_ids": enc["input_ids"].astype(np.int64),
                                                  "attention_mask": enc["attention_mask"].astype(np.int64)})[0]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_onnx_export_embeds_as_the_embedder_does(tiny_path, tmp_path, pooling):
    src = Embedder.from_pretrained(tiny_path, pooling=pooling, query_prefix="query: ").save_pretrained(tmp_path / "m")
    out = tmp_path / "onnx"
    p = run_in_process("export.py", "--model", str(src), "--out", str(out), "--format", "onnx",
                                "--summary", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["format"] == "onnx" and summary["max_abs_diff"] <= 1e-5 and "model.onnx" in summary["files"]
    emb = Embedder.from_pretrained(src)
    for kind in ("query", "passage"):
        for texts in (TEXTS, TEXTS[:1]):
            np.testing.assert_allclose(onnx_embed(out, texts, kind), emb.encode(texts, kind=kind).numpy(), rtol=0, atol=1e-5)
    # normalisation is inside the graph
    np.testing.assert_allclose(np.linalg.norm(onnx_embed(out, TEXTS, "passage"), axis=1), 1.0, atol=1e-5)


def test_onnx_export_of_an_moe_model_exits_2_with_the_reason(tiny_path, tmp_path):
    folder = perturbed_moe_folder(tiny_path, tmp_path / "moe")
    p = run_in_process("export.py", "--model", str(folder), "--out", str(tmp_path / "o"), "--format", "onnx")
    assert p.returncode == 2 and "dense models only" in p.stderr and "--format sentence-transformers" in p.stderr
    assert not (tmp_path / "o").exists()


def test_sentence_transformers_export_of_a_registered_moe_model(tiny_path, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = perturbed_moe_folder(tiny_path, tmp_path / "moe")
    register_model(uri, folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "st"
    p = run_in_process("export.py", "--model", "models:/clp-ray-hi@champion", "--out", str(out),
                                "--summary", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["checked_with"] == "sentence-transformers" and summary["moe"]["num_experts"] == 3
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    np.testing.assert_allclose(st.encode_query(TEXTS), Embedder.from_pretrained(folder).encode(TEXTS, kind="query").numpy(),
                               rtol=0, atol=1e-5)


def test_exports_carry_bge_m3_heads_and_onnx_returns_their_outputs(tmp_path):
    """Both formats copy the heads byte for byte; the ONNX graph's sparse_weights and
    colbert_vectors, post-processed as the export docs say, equal Embedder.encode's modes."""
    import onnxruntime as ort
    import torch

    from clp_ray.config import TinyModelConfig
    from clp_ray.model.m3 import HEAD_FILES, lexical_weights, sparse_vectors, unused_token_ids
    from clp_ray.model.tiny import tiny_model_path

    src = tiny_model_path(TinyModelConfig(m3_heads=True))
    emb = Embedder.from_pretrained(src)
    for fmt in ("onnx", "sentence-transformers"):
        p = run_in_process("export.py", "--model", str(src), "--out", str(tmp_path / fmt), "--format", fmt)
        assert p.returncode == 0, p.stderr
        for f in HEAD_FILES:
            assert (tmp_path / fmt / f).read_bytes() == (src / f).read_bytes()
    assert Embedder.from_pretrained(tmp_path / "sentence-transformers").modes == ("dense", "sparse", "colbert")
    enc = emb.tokenize(TEXTS, kind="passage")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    dense, weights, vectors = session.run(["sentence_embedding", "sparse_weights", "colbert_vectors"],
                                          {k: enc[k].numpy() for k in ("input_ids", "attention_mask")})
    want = emb.encode(TEXTS, kind="passage", output=("dense", "sparse", "colbert"))
    np.testing.assert_allclose(dense, want.dense.numpy(), rtol=0, atol=1e-5)
    got = lexical_weights(sparse_vectors(torch.from_numpy(weights), enc["input_ids"], enc["attention_mask"],
                                         emb.encoder.config.vocab_size, unused_token_ids(emb.tokenizer)))
    for i in range(len(TEXTS)):
        assert got[i].keys() == want.sparse[i].keys()
        assert all(abs(got[i][t] - w) < 1e-5 for t, w in want.sparse[i].items())
        real = enc["attention_mask"][i, 1:].bool().numpy()
        np.testing.assert_allclose(vectors[i][real], want.colbert[i].numpy(), rtol=0, atol=1e-5)
        assert not vectors[i][~real].any()  # zero at padding
