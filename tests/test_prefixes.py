"""Query/passage prefixes (E5's "query: " / "passage: ") reach every path that embeds text:
training batches (queries, passages and neg_q), evaluation, mining (in the job's process and in
Ray Data actors) and the registered pyfunc. Each check compares a path's vectors with the model
encoding the prefixed texts by hand, so it fails if that path drops or swaps a prefix."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clp_ray.model.embedder import Embedder

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["셀 보호 해제", "insert rows above", "차트 데이터 범위"]
PASSAGES = ["Protecting cells in the current sheet.", "행 삽입: 선택한 행 위에 새 행을 넣습니다.", "Chart data ranges"]
QP, PP = "query: ", "passage: "


@pytest.fixture(scope="module")
def prefix_folder(tiny_path, tmp_path_factory):
    emb = Embedder.from_pretrained(tiny_path, query_prefix=QP, passage_prefix=PP)
    return emb.save_pretrained(tmp_path_factory.mktemp("prefixed") / "model")


@pytest.fixture()
def emb(prefix_folder):
    return Embedder.from_pretrained(prefix_folder)


def by_hand(emb, texts, prefix, kind):
    return emb.encode([prefix + t for t in texts], max_length=emb.settings.max_len(kind))


def test_folder_carries_the_prefixes(emb):
    assert (emb.query_prefix, emb.passage_prefix) == (QP, PP)
    assert emb.settings_sources["query_prefix"] == "clp_ray.json"
    assert not torch.allclose(emb.encode(QUERIES, kind="query"), emb.encode(QUERIES), atol=1e-3)  # the prefix matters


def test_training_batches_prefix_queries_passages_and_neg_q(emb):
    from clp_ray.data import Collator, Group
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings

    groups = [Group(q, [p, PASSAGES[(i + 1) % 3]], [QUERIES[(i + 1) % 3]]) for i, (q, p) in enumerate(zip(QUERIES, PASSAGES))]
    batch = Collator.for_embedder(emb, bucket_size=2)(groups)
    module = CLPObjective(emb, LossSettings(temperature=0.05, lam=0.1, cross_device=False)).eval()
    with torch.no_grad():
        q, p, nq = (module.encode(batch[k]).emb for k in ("query", "passage", "neg_query"))
    torch.testing.assert_close(q, by_hand(emb, QUERIES, QP, "query"), rtol=0, atol=1e-5)
    torch.testing.assert_close(p, by_hand(emb, [t for g in groups for t in g.passages], PP, "passage"), rtol=0, atol=1e-5)
    torch.testing.assert_close(nq, by_hand(emb, [g.neg_queries[0] for g in groups], QP, "query"), rtol=0, atol=1e-5)


def test_evaluation_scores_prefixed_queries_against_prefixed_passages(emb):
    from clp_ray.evaluation import RetrievalSet, evaluate

    data = RetrievalSet(corpus={f"d{i}": t for i, t in enumerate(PASSAGES)},
                        queries={f"q{i}": t for i, t in enumerate(QUERIES)}, qrels={f"q{i}": {f"d{i}": 1} for i in range(3)})
    res = evaluate(emb, data, top_k=10)
    expected = by_hand(emb, QUERIES, QP, "query") @ by_hand(emb, PASSAGES, PP, "passage").T
    got = torch.tensor([[res.run[f"q{i}"][f"d{j}"] for j in range(3)] for i in range(3)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_ray_data_actor_prefixes(prefix_folder, emb):
    from clp_ray.mining import _EncodeActor

    for kind, texts, prefix in (("query", QUERIES, QP), ("passage", PASSAGES, PP)):
        out = _EncodeActor(str(prefix_folder), kind, batch_size=2)({"i": np.arange(3), "text": np.array(texts)})
        torch.testing.assert_close(torch.from_numpy(out["vec"]), by_hand(emb, texts, prefix, kind), rtol=0, atol=1e-5)


def test_registered_pyfunc_prefixes(prefix_folder, emb, tmp_path, monkeypatch):
    import mlflow

    from clp_ray.config import load_config
    from clp_ray.tracking.registry import log_embedder_model
    from clp_ray.tracking.runs import start_run

    monkeypatch.chdir(tmp_path)
    cfg = load_config("hi", "tiny", [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    tracker = start_run(cfg, "prefixes")
    try:
        info = log_embedder_model(tracker, prefix_folder)
        model = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    np.testing.assert_allclose(model.predict(QUERIES), by_hand(emb, QUERIES, QP, "query").numpy(), atol=1e-5)
    np.testing.assert_allclose(model.predict(PASSAGES, params={"kind": "passage"}),
                               by_hand(emb, PASSAGES, PP, "passage").numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="params\\['kind'\\] must be 'query' or 'passage'"):
        model.predict(QUERIES, params={"kind": "doc"})


@pytest.mark.slow
def test_mine_job_embeds_with_the_folder_prefixes(prefix_folder, emb, tmp_path):
    """The job's own encoding (local engine) mines exactly what the by-hand prefixed vectors mine."""
    from clp_ray.config import MiningConfig
    from clp_ray.evaluation import load_beir
    from clp_ray.mining import mine

    out, summary = tmp_path / "mined.jsonl", tmp_path / "s.json"
    sets = ["mining.margin_mode=absolute", "mining.margin=0", "mining.rank_window=[2, 30]", "mining.top_k=30"]
    cmd = [sys.executable, "jobs/mine.py", "--lang", "hi", "--profile", "tiny", "--model", str(prefix_folder),
           "--data", "pkg://ko_help", "--split", "dev", "--out", str(out), "--summary", str(summary)]
    p = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    data = load_beir("pkg://ko_help", "dev")
    doc_ids, qids = list(data.corpus), list(data.queries)
    d = by_hand(emb, [data.corpus[i] for i in doc_ids], PP, "passage")
    q = by_hand(emb, [data.queries[i] for i in qids], QP, "query")
    cfg = MiningConfig(margin_mode="absolute", margin=0, rank_window=(2, 30), top_k=30)
    records, _ = mine(q, d, qids, doc_ids, data.queries, data.corpus, data.qrels, cfg)
    mined = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(mined) > 50 and mined == records
