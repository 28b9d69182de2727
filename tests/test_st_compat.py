"""Every folder clp-ray saves loads in sentence-transformers with the same embeddings."""

import json

import numpy as np
import pytest
from conftest import perturbed_moe_folder

from clp_ray.model.embedder import Embedder
from clp_ray.model.settings import folder_settings

# One long text: truncation at the query length (8 tokens) and at the passage length (24) differ.
TEXTS = ["셀 보호 해제", "Insert rows above", "차트 데이터 범위를 바꾸는 방법 " * 12, "x"]
SETTINGS = {"pooling": "cls", "query_prefix": "query: ", "passage_prefix": "passage: ",
            "query_max_len": 8, "passage_max_len": 24}


def st_model(folder, **kw):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", **kw)


def assert_same_embeddings(emb: Embedder, st) -> None:
    for kind, encode in (("query", st.encode_query), ("passage", st.encode_document)):
        np.testing.assert_allclose(encode(TEXTS), emb.encode(TEXTS, kind=kind).numpy(), rtol=0, atol=1e-5)
    # plain encode: no prompt, the passage length (Embedder.encode with kind=None)
    np.testing.assert_allclose(st.encode(TEXTS), emb.encode(TEXTS).numpy(), rtol=0, atol=1e-5)


def test_a_dense_folder_loads_in_sentence_transformers_with_the_same_embeddings(tiny_path, tmp_path):
    emb = Embedder.from_pretrained(tiny_path, **SETTINGS)
    folder = emb.save_pretrained(tmp_path / "dense")
    st = st_model(folder)
    assert st.max_seq_length == 24 and st.prompts["query"] == "query: "
    assert_same_embeddings(emb, st)
    # The files describe the model by themselves: clp-ray reads the same settings from them.
    (folder / "clp_ray.json").unlink()
    assert {k: v for k, (v, _) in folder_settings(folder).items()} == {**SETTINGS, "normalize": True}


def test_an_unnormalised_mean_pooled_folder_too(tiny_path, tmp_path):
    emb = Embedder.from_pretrained(tiny_path, pooling="mean", normalize=False)
    folder = emb.save_pretrained(tmp_path / "m")
    assert [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())] == [
        "Transformer", "Pooling"]
    assert_same_embeddings(emb, st_model(folder))


def test_an_moe_folder_loads_through_clp_rays_module(tiny_path, tmp_path):
    from clp_ray.model.st_module import MoETransformer

    folder = perturbed_moe_folder(tiny_path, tmp_path / "moe")
    emb = Embedder.from_pretrained(folder, **SETTINGS)
    folder = emb.save_pretrained(tmp_path / "moe2")
    st = st_model(folder, trust_remote_code=True)
    assert isinstance(st[0], MoETransformer)
    assert_same_embeddings(emb, st)
    # the experts matter: the dense encoder under them embeds differently
    dense = Embedder.from_pretrained(tiny_path, **SETTINGS).encode(TEXTS, kind="query").numpy()
    assert np.abs(dense - st.encode_query(TEXTS)).max() > 1e-3


def test_an_moe_folder_is_never_loaded_as_a_dense_model(tiny_path, tmp_path):
    folder = perturbed_moe_folder(tiny_path, tmp_path / "moe")
    with pytest.raises(ValueError, match="trust_remote_code"):
        st_model(folder)
