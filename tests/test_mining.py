import json
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_in_process

from clp_ray.config import GeneratorConfig, MiningConfig
from clp_ray.mining import QueryGenerator, mine, select_negatives

ROOT = Path(__file__).resolve().parents[1]


def test_window_positives_and_margin_guard():
    docs = [f"d{i}" for i in range(10)]
    scores = [1.0, 0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    cfg = MiningConfig(top_k=10, rank_window=(2, 8), negatives_per_query=10, margin=0.85)
    negs, guarded = select_negatives(scores, docs, {"d3": 1}, 1.0, cfg, random.Random(0))
    # rank 1 and ranks 9-10 are outside the window; d3 is a positive; d1 (0.99) and d2 (0.9) are within
    # the relative margin (>= 0.85 x positive) and are guarded as likely false negatives.
    assert sorted(negs) == ["d4", "d5", "d6", "d7"] and guarded == 2
    absolute = MiningConfig(top_k=10, rank_window=(2, 8), negatives_per_query=10, margin=0.25, margin_mode="absolute")
    negs, guarded = select_negatives(scores, docs, {"d3": 1}, 1.0, absolute, random.Random(0))
    assert sorted(negs) == ["d4", "d5", "d6", "d7"] and guarded == 2  # >= 0.75 skipped
    few = MiningConfig(top_k=10, rank_window=(2, 8), negatives_per_query=2, margin=0.85)
    assert len(select_negatives(scores, docs, {}, 1.0, few, random.Random(0))[0]) == 2


def test_margin_guard_with_negative_scores_never_passes_a_candidate_above_the_positive():
    """Relative mode used limit = margin x positive: for a negative positive score that limit lies
    above the positive, so candidates scoring better than the positive got through."""
    docs = [f"d{i}" for i in range(6)]
    scores = [-0.10, -0.47, -0.50, -0.52, -0.60, -0.90]  # the positive d2 scores -0.50; d1 scores above it
    for cfg, kept in (
        (MiningConfig(top_k=6, rank_window=(1, 6), negatives_per_query=6, margin=0.9), ["d4", "d5"]),  # < -0.55
        (MiningConfig(top_k=6, rank_window=(1, 6), negatives_per_query=6, margin=0.05, margin_mode="absolute"),
         ["d4", "d5"]),  # < -0.55
        (MiningConfig(top_k=6, rank_window=(1, 6), negatives_per_query=6, margin=1.0), ["d3", "d4", "d5"]),  # < -0.50
    ):
        negs, guarded = select_negatives(scores, docs, {"d2": 1}, -0.50, cfg, random.Random(0))
        assert sorted(negs) == kept and guarded == 5 - len(kept), (cfg.margin_mode, cfg.margin)
        assert all(scores[docs.index(n)] < -0.50 for n in negs)


def toy(n_q=12, n_d=30, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = F.normalize(torch.randn(n_d, dim, generator=gen), dim=-1)
    doc_ids = [f"d{i}" for i in range(n_d)]
    qids = [f"q{i}" for i in range(n_q)]
    # query i is a noisy copy of its positive passage i; passages 0..n_q-1 are each some query's positive
    q = F.normalize(d[:n_q] + 0.3 * torch.randn(n_q, dim, generator=gen), dim=-1)
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(n_q)}
    queries = {k: f"query {k}" for k in qids}
    corpus = {k: f"passage {k}" for k in doc_ids}
    return q, d, qids, doc_ids, queries, corpus, qrels


def test_mined_records_exclude_positives_and_use_the_right_neg_q():
    q, d, qids, doc_ids, queries, corpus, qrels = toy()
    cfg = MiningConfig(top_k=30, rank_window=(1, 30), negatives_per_query=5, margin=1.5)
    records, stats = mine(q, d, qids, doc_ids, queries, corpus, qrels, cfg)
    assert records and stats.written == len(records)
    owner = {corpus[f"d{i}"]: queries[f"q{i}"] for i in range(12)}
    for r in records:
        assert not set(r["neg"]) & set(r["pos"])
        assert len(r["neg"]) == len(r["neg_q"])
        for neg, nq in zip(r["neg"], r["neg_q"]):
            assert owner[neg] == nq  # the query whose positive this negative is
    # passages 12..29 have no judged query: with generator "none" they are dropped and counted
    assert stats.negatives_dropped > 0 and stats.neg_q_from_qrels == stats.negatives
    again, _ = mine(q, d, qids, doc_ids, queries, corpus, qrels, cfg)
    assert again == records  # same seed, same file
    other, _ = mine(q, d, qids, doc_ids, queries, corpus, qrels, cfg.model_copy(update={"seed": 99}))
    assert other != records


class FakeLLM(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    behaviour = "ok"  # ok | fail_once | slow_once

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        n = FakeLLM.hits[prompt] = FakeLLM.hits.get(prompt, 0) + 1
        if FakeLLM.behaviour == "fail_once" and n == 1:
            self.send_response(500)
            self.end_headers()
            return
        if FakeLLM.behaviour == "slow_once" and n == 1:
            time.sleep(1.5)
        if FakeLLM.behaviour in ("unauthorized", "down") or (FakeLLM.behaviour == "flaky" and "bad" in prompt):
            self.send_response(401 if FakeLLM.behaviour == "unauthorized" else 503)
            self.end_headers()
            return
        passage = prompt.rsplit("\n", 1)[-1]
        out = json.dumps({"choices": [{"message": {"content": f"what is in {passage}?"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture()
def llm_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeLLM.hits = {}
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("behaviour", ["ok", "fail_once", "slow_once"])
def test_generator_over_http_retries_times_out_and_caches(llm_server, tmp_path, behaviour):
    FakeLLM.behaviour = behaviour
    cfg = GeneratorConfig(kind="openai", base_url=llm_server, model="m", concurrency=2, max_retries=2, timeout_s=0.5,
                          cache_dir=str(tmp_path / "cache"), prompt="Query for:\n{passage}")
    gen = QueryGenerator(cfg)
    out = gen.generate_many(["p1", "p2", "p3"])
    assert out == ["what is in p1?", "what is in p2?", "what is in p3?"]
    expected_requests = 3 if behaviour == "ok" else 6  # each prompt's first answer fails or times out once
    assert gen.requests == expected_requests and sum(FakeLLM.hits.values()) == expected_requests
    again = QueryGenerator(cfg)
    assert again.generate_many(["p1", "p2", "p3"]) == out
    assert again.requests == 0 and again.cache_hits == 3  # a re-run never pays twice
    assert sum(FakeLLM.hits.values()) == expected_requests


def test_a_failing_generator_stops_mining_instead_of_dropping_negatives(llm_server, tmp_path):
    from clp_ray.errors import ClpRayError

    def gen(**kw):
        return QueryGenerator(GeneratorConfig(kind="openai", base_url=llm_server, max_retries=1, timeout_s=2,
                                              cache_dir=str(tmp_path / "cache"), prompt="Query for:\n{passage}", **kw))

    FakeLLM.behaviour = "unauthorized"  # a bad key: no retries, no second passage
    with pytest.raises(ClpRayError, match=r"refused the request \(HTTP 401\): check \$OPENAI_API_KEY"):
        gen(concurrency=1).generate_many([f"p{i}" for i in range(50)])
    assert sum(FakeLLM.hits.values()) == 1
    FakeLLM.behaviour, FakeLLM.hits = "down", {}
    with pytest.raises(ClpRayError, match=r"3 passages in a row got no query"):
        gen(concurrency=1, max_consecutive_failures=3).generate_many([f"p{i}" for i in range(50)])
    assert sum(FakeLLM.hits.values()) == 6  # 3 passages x 2 attempts, then it stops
    FakeLLM.behaviour, FakeLLM.hits = "flaky", {}
    passages = [f"p{i}" for i in range(18)] + ["bad1", "bad2"]
    with pytest.raises(ClpRayError, match=r"2 of 20 passages got no query \(more than mining.generator.max_failure_rate = 0.05\)"):
        gen().generate_many(passages)
    ok = gen(max_failure_rate=0.2)
    out = ok.generate_many(passages)  # cached answers now; the two failures are tolerated and counted
    assert out[:18] == [f"what is in p{i}?" for i in range(18)] and out[18:] == [None, None] and ok.failures == 2


def test_a_corrupt_cache_entry_is_asked_again(llm_server, tmp_path):
    FakeLLM.behaviour = "ok"
    cfg = GeneratorConfig(kind="openai", base_url=llm_server, cache_dir=str(tmp_path / "cache"), prompt="Q:\n{passage}")
    assert QueryGenerator(cfg).generate_many(["p1"]) == ["what is in p1?"]
    (entry,) = (tmp_path / "cache").glob("*.json")
    entry.write_text('{"query": "trunc')
    again = QueryGenerator(cfg)
    assert again.generate_many(["p1"]) == ["what is in p1?"] and again.requests == 1
    assert json.loads(entry.read_text())["query"] == "what is in p1?"


def test_mining_with_generator_fills_unknown_neg_q(llm_server, tmp_path):
    FakeLLM.behaviour = "ok"
    q, d, qids, doc_ids, queries, corpus, qrels = toy()
    cfg = MiningConfig(top_k=30, rank_window=(1, 30), negatives_per_query=5, margin=1.5,
                       generator=GeneratorConfig(kind="openai", base_url=llm_server, cache_dir=str(tmp_path / "c"),
                                                 prompt="Query for:\n{passage}"))
    records, stats = mine(q, d, qids, doc_ids, queries, corpus, qrels, cfg)
    assert stats.negatives_dropped == 0 and stats.neg_q_generated > 0
    assert stats.neg_q_generated + stats.neg_q_from_qrels == stats.negatives == 5 * len(records)
    generated = [nq for r in records for nq in r["neg_q"] if nq.startswith("what is in")]
    assert len(generated) == stats.neg_q_generated


@pytest.mark.slow
@pytest.mark.ray  # starts Ray: run apart from the rest (scripts/test.sh)
def test_mine_job_output_validates_and_trains(tmp_path):
    import ray

    from clp_ray.config import load_config
    from clp_ray.data import validate
    from clp_ray.train import ensure_ray

    assets = ROOT / "clp_ray" / "assets" / "ko_help"
    qrels = tmp_path / "train.tsv"
    rows = (assets / "qrels" / "dev.tsv").read_text().splitlines() + (assets / "qrels" / "test.tsv").read_text().splitlines()[1:]
    qrels.write_text("\n".join(rows) + "\n")
    out, summary = tmp_path / "mined.jsonl", tmp_path / "s.json"
    mine = ["--lang", "ko", "--profile", "tiny", "--model", "tiny", "--corpus", str(assets / "corpus.jsonl"),
            "--queries", str(assets / "queries.jsonl"), "--qrels", str(qrels),
            "--set", "mining.margin_mode=absolute", "--set", "mining.margin=0"]
    p = run_in_process("mine.py", *mine, "--out", str(out), "--summary", str(summary))
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["written"] > 100 and s["neg_q_from_qrels"] == s["negatives"] and s["negatives_dropped"] > 0
    report = validate([str(out)], require_neg_q=True, group_size=2)  # what `python -m clp_ray.data OUT --lam 0.1` checks
    assert report.bad == 0 and report.good == s["written"]
    # The jobs as on a cluster (Ray up first; in this process to spare two interpreter and Ray starts):
    # the same mining with encoding and search as Ray Data batch jobs, then training on its output.
    ensure_ray(load_config("ko", "tiny", ["ray.num_cpus=4"]))
    try:
        p = run_in_process("mine.py", *mine, "--out", str(tmp_path / "ray.jsonl"), "--summary", str(tmp_path / "r.json"),
                           "--set", "mining.engine=ray")
        assert p.returncode == 0, p.stderr[-3000:]
        t = run_in_process("train.py", "--lang", "ko", "--profile", "tiny", "--set", f"data.train_paths=[{out}]",
                           "--set", "data.train_group_size=2", "--set", "train.max_steps=2",
                           "--set", f"train.output_dir={tmp_path / 'o'}",
                           "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                           "--summary", str(tmp_path / "t.json"))
    finally:
        ray.shutdown()
    r = json.loads((tmp_path / "r.json").read_text())
    assert abs(r["written"] - s["written"]) <= 0.05 * s["written"]  # equal up to near-tied scores
    assert t.returncode == 0, t.stderr[-3000:]
    assert json.loads((tmp_path / "t.json").read_text())["metrics"]["step"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_ray_data_encoding_and_search_match_local(tiny_path, tmp_path):
    import os

    import mlflow
    import ray

    from clp_ray.config import load_config
    from clp_ray.evaluation import exact_search, load_beir
    from clp_ray.mining import encode_with_ray_data, search_with_ray_data
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.tiny import tiny_model_path
    from clp_ray.tracking.registry import log_embedder_model
    from clp_ray.tracking.runs import start_run
    from clp_ray.train import ensure_ray

    texts = list(load_beir("pkg://ko_help", "dev").corpus.values())[:200]
    local = Embedder.from_pretrained(tiny_path).encode(texts, batch_size=32, max_length=128)
    # The actors load what the driver means, not what their own defaults or working folder say:
    # "tiny" with the driver's sizes, and models:/ from the driver's MLflow store (no
    # $MLFLOW_TRACKING_URI here; the workers run in another folder).
    cfg = load_config("ko", "tiny", ["model.tiny.seed=7", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    seeded = Embedder.from_pretrained(tiny_model_path(cfg.model.tiny))
    tracker = start_run(cfg, "sweep")
    try:
        version = log_embedder_model(tracker, seeded.save_pretrained(tmp_path / "model"), registered_name="clp-ray-hi",
                                     tags={"test_ndcg_at_10": 0.5, "eval_set_hash": "h", "data_hash": "d"}).version
        tracker.end()
    finally:
        # MLflow 3's set_tracking_uri also exports $MLFLOW_TRACKING_URI, which Ray's workers would
        # inherit; unset, the store can only reach them through the driver.
        mlflow.set_tracking_uri(None)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    few = texts[:48]
    local_seeded = seeded.encode(few, batch_size=16, max_length=128)
    ensure_ray(load_config("ko", "tiny"))
    try:
        distributed = encode_with_ray_data("tiny", texts, kind="passage", batch_size=32, concurrency=2)
        s_ray, i_ray = search_with_ray_data(local[:40], local, 10, chunk_size=64, batch_size=16, concurrency=2)
        tiny_seeded = encode_with_ray_data("tiny", few, kind="passage", batch_size=16, concurrency=1, model_cfg=cfg.model)
        registered = encode_with_ray_data(f"models:/clp-ray-hi/{version}", few, kind="passage", batch_size=16,
                                          concurrency=1, tracking_uri=cfg.tracking.tracking_uri)
    finally:
        ray.shutdown()
    assert not torch.allclose(local_seeded, local[:48], atol=1e-3)  # another seed: another model
    torch.testing.assert_close(tiny_seeded, local_seeded, rtol=0, atol=1e-5)
    torch.testing.assert_close(registered, local_seeded, rtol=0, atol=1e-5)
    torch.testing.assert_close(distributed, local, rtol=0, atol=1e-5)
    s_loc, _ = exact_search(local[:40], local, 10, chunk_size=64)
    torch.testing.assert_close(s_ray, s_loc, rtol=0, atol=1e-5)
    torch.testing.assert_close((local[:40] @ local.T).gather(1, i_ray), s_ray, rtol=0, atol=1e-5)  # indices match scores


def test_mine_job_inputs_and_errors(tmp_path):
    def job(*args, env=None):
        import os

        if env is None:  # in this process: no Ray, and no environment read at import time
            return run_in_process("mine.py", "--lang", "ko", "--profile", "tiny", "--model", "tiny",
                                  "--out", str(tmp_path / "o.jsonl"), *args)
        return subprocess.run([sys.executable, "jobs/mine.py", "--lang", "ko", "--profile", "tiny", "--model", "tiny",
                               "--out", str(tmp_path / "o.jsonl"), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, **(env or {})})

    p = job()
    assert p.returncode == 2 and "give --data DIR|miracl://<lang>" in p.stderr
    (tmp_path / "a-file").write_text("")
    p = job("--data", "pkg://ko_help", "--out", str(tmp_path / "a-file" / "o.jsonl"))  # the last --out wins
    assert p.returncode == 2 and "--out" in p.stderr and "a-file is a file, not a folder)" in p.stderr
    assert "mining" not in p.stderr  # failed before loading the model and encoding
    p = job("--data", "miracl://hi", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert p.returncode == 2 and "cannot load MIRACL 'hi' split 'train' from the Hugging Face hub" in p.stderr
    assert "Traceback" not in p.stderr
    p = job("--data", "pkg://ko_help", "--split", "dev", "--set", "mining.margin_mode=absolute", "--set", "mining.margin=0",
            "--summary", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "s.json").read_text())["written"] > 0


def test_a_failed_write_leaves_the_previous_output_untouched(tmp_path):
    from clp_ray.data import validate
    from clp_ray.errors import DataError
    from clp_ray.mining import write_records

    out = tmp_path / "train.jsonl"
    good = [{"query": "q", "pos": ["p"], "neg": ["n"], "neg_q": ["x"]}]
    write_records(good, out, check=lambda tmp: validate([str(tmp)], require_neg_q=True, group_size=2))
    before = out.read_bytes()
    bad = [{"query": "q", "pos": ["p"], "neg": [""], "neg_q": ["x"]}]  # an empty negative fails validation
    with pytest.raises(DataError, match="neg: item 0 is an empty string"):
        write_records(bad, out, check=lambda tmp: validate([str(tmp)], require_neg_q=True, group_size=2))
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]
