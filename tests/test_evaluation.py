import json
import math
from pathlib import Path

import ir_measures
import pytest
import torch
from conftest import run_in_process

from clp_ray.errors import DataError
from clp_ray.evaluation import EvalResult, compare, exact_search, load_beir, score_run, write_trec_run

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_equal_hand_computed_values():
    qrels = {"q1": {"d1": 1, "d3": 1, "d9": 0}, "q2": {"d2": 2}, "q3": {"d5": 1}}
    run = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.1, "d4": 0.05}, "q2": {"d1": 0.5, "d2": 0.4}}  # q3 retrieved nothing
    means, per_q = score_run(qrels, run)
    l2 = math.log2
    ndcg_q1 = (1 / l2(3) + 1 / l2(4)) / (1 + 1 / l2(3))
    ndcg_q2 = (2 / l2(3)) / 2
    assert per_q["ndcg@10"]["q1"] == pytest.approx(ndcg_q1)
    assert per_q["ndcg@10"]["q2"] == pytest.approx(ndcg_q2)
    assert per_q["ndcg@10"]["q3"] == 0.0  # missing from the run counts as 0, not skipped
    assert means["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 3)
    assert means["ndcg@5"] == pytest.approx((ndcg_q1 + ndcg_q2) / 3)
    assert means["mrr@10"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert means["recall@100"] == pytest.approx((1 + 1 + 0) / 3)


def test_perfect_run_scores_one():
    qrels = {"a": {"x": 1, "y": 1}, "b": {"z": 1}}
    run = {"a": {"x": 3.0, "y": 2.0, "z": 1.0}, "b": {"z": 5.0, "x": 1.0}}
    means, _ = score_run(qrels, run)
    assert all(v == pytest.approx(1.0) for v in means.values())


def test_chunked_exact_search_equals_brute_force_sort():
    gen = torch.Generator().manual_seed(0)
    q, d = torch.randn(11, 8, generator=gen), torch.randn(53, 8, generator=gen)
    scores, idx = exact_search(q, d, 10, chunk_size=7, query_chunk=3)
    full = q @ d.T
    ref = full.sort(dim=1, descending=True)
    assert torch.equal(idx, ref.indices[:, :10])
    torch.testing.assert_close(scores, ref.values[:, :10])
    s_all, i_all = exact_search(q, d, 100, chunk_size=7)  # k larger than the corpus
    assert i_all.shape == (11, 53) and torch.equal(i_all, ref.indices)


def _beir(tmp_path, qrels_rows, queries=("q1", "q2")):
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "T", "text": f"text {d}"}) + "\n"
                                               for d in ("d1", "d2", "d3")))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in qrels_rows))
    return root


def test_load_beir_and_errors(tmp_path):
    root = _beir(tmp_path, [("q1", "d1", 1), ("q1", "d2", 0)])
    data = load_beir(root, "test")
    assert data.queries == {"q1": "query q1"}  # q2 has no judgements: not evaluated
    assert data.corpus["d1"] == "T text d1" and data.qrels == {"q1": {"d1": 1, "d2": 0}}
    with pytest.raises(DataError, match=r"qrels for split 'dev' not found \(available: test\)"):
        load_beir(root, "dev")
    bad = _beir(tmp_path / "x", [("q1", "d1", 1), ("q7", "d1", 1), ("q8", "d2", 1), ("q1", "d99", 1)])
    with pytest.raises(DataError, match=r"2 unknown query id\(s\), e.g. \['q7', 'q8'\]; 1 unknown corpus id\(s\)"):
        load_beir(bad, "test")
    empty = _beir(tmp_path / "y", [])
    with pytest.raises(DataError, match="no queries to evaluate"):
        load_beir(empty, "test")
    with pytest.raises(DataError, match="evaluation data folder not found"):
        load_beir(tmp_path / "missing", "test")
    (root / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match="corpus file not found"):
        load_beir(root, "test")


def test_load_beir_rejects_rows_it_would_misread(tmp_path):
    """Each of these used to end in a codec/TypeError traceback or in silently kept-last data."""
    root = _beir(tmp_path, [("q1", "d1", 1)])
    corpus, queries, qrels = root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / "test.tsv"
    good_corpus, good_queries, good_qrels = corpus.read_bytes(), queries.read_bytes(), qrels.read_bytes()

    def fails(path, content, pattern):
        path.write_bytes(content)
        with pytest.raises(DataError, match=pattern):
            load_beir(root, "test")
        path.write_bytes({corpus: good_corpus, queries: good_queries, qrels: good_qrels}[path])

    fails(corpus, good_corpus + b'{"_id": "d4", "text": "caf\xe9"}\n', r"corpus.jsonl:4: invalid UTF-8 at byte 26")
    fails(queries, b'{"_id": "q1", "text": "\xff"}\n', r"queries.jsonl:1: invalid UTF-8")
    fails(qrels, good_qrels + b"q1\td2\t\xff\n", r"test.tsv:3: invalid UTF-8")
    fails(corpus, good_corpus + b'{"_id": "d4", "text": 5}\n', r"corpus.jsonl:4: text: expected a string, got int")
    fails(corpus, good_corpus + b'{"_id": "d4", "title": ["a"]}\n', r"corpus.jsonl:4: title: expected a string, got list")
    fails(corpus, good_corpus + b'{"_id": null, "text": "x"}\n', r"corpus.jsonl:4: _id: expected a string or an integer")
    fails(corpus, good_corpus + b'{"_id": "d1", "title": "T", "text": "other"}\n',
          r"corpus.jsonl:4: _id 'd1' repeated with different text \(first at line 1\)")
    fails(queries, good_queries + b'{"_id": "q1", "text": "changed"}\n', r"queries.jsonl:3: _id 'q1' repeated")
    fails(queries, b'{"_id": "q1", "text": ""}\n', r"1 judged query id\(s\) with empty text in .*queries.jsonl, e.g. \['q1'\]")
    fails(qrels, good_qrels + b"q1\td1\t0\n",
          r"1 \(query, document\) pair\(s\) judged twice with different scores, e.g. \[\('q1', 'd1'\)\]")
    fails(qrels, good_qrels + b"q1\td2\tinf\n", r"1 malformed row")
    # Harmless repeats and Windows line ends load as before.
    corpus.write_bytes(good_corpus + good_corpus.splitlines(keepends=True)[0])
    qrels.write_bytes(good_qrels.replace(b"\n", b"\r\n") + b"q1\td1\t1\r\n")
    data = load_beir(root, "test")
    assert len(data.corpus) == 3 and data.qrels == {"q1": {"d1": 1}}


def test_trec_run_file(tmp_path):
    path = write_trec_run(tmp_path / "run.trec", {"q1": {"d2": 0.5, "d1": 0.9}})
    assert path.read_text().splitlines() == ["q1 Q0 d1 1 0.9 clp-ray", "q1 Q0 d2 2 0.5 clp-ray"]
    # Scores 1e-8 apart (a barely trained model's) keep their order in the file: re-scored by
    # ir_measures they give the metrics score_run gave the run itself.
    run = {"q1": {"d1": 0.71234561, "d2": 0.71234562, "d3": 0.1}}
    qrels = {"q1": {"d1": 1}}
    path = write_trec_run(tmp_path / "close.trec", run)
    again = {}
    for r in ir_measures.read_trec_run(str(path)):
        again.setdefault(r.query_id, {})[r.doc_id] = r.score
    assert again == run
    assert score_run(qrels, again) == score_run(qrels, run) and score_run(qrels, run)[0]["mrr@10"] == 0.5


def test_paired_comparison_matches_scipy():
    from scipy.stats import ttest_rel

    a = EvalResult({}, {"ndcg@10": {"q1": 0.1, "q2": 0.5, "q3": 0.2, "q4": 0.0}})
    b = EvalResult({}, {"ndcg@10": {"q1": 0.3, "q2": 0.6, "q3": 0.2, "q4": 0.4}})
    c = compare(a, b)
    assert c.diff == pytest.approx(0.175) and c.num_queries == 4
    assert c.p_value == pytest.approx(ttest_rel([0.1, 0.5, 0.2, 0.0], [0.3, 0.6, 0.2, 0.4]).pvalue)
    assert compare(a, a).p_value == 1.0


def run_job(*args):
    return run_in_process("evaluate.py", *args)


@pytest.mark.slow
def test_evaluate_job_end_to_end(tmp_path, tiny_embedder):
    summary = tmp_path / "s.json"
    run_file = tmp_path / "run.trec"
    p = run_job("--model", "tiny", "--data", "pkg://ko_help", "--split", "test", "--run-file", str(run_file),
                "--summary", str(summary))
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(summary.read_text())
    assert set(s["metrics"]) == {"ndcg@10", "ndcg@5", "recall@100", "mrr@10"}
    assert s["num_queries"] == 942 and 0 < s["metrics"]["ndcg@10"] < 1
    lines = run_file.read_text().splitlines()
    assert len(lines) == 942 * 100 and lines[0].split()[1] == "Q0"
    assert "ndcg@10" in p.stdout

    # --compare: the tiny model vs an upcycled, perturbed copy saved as a folder.
    tiny_embedder.upcycle([-1], num_experts=2)
    with torch.no_grad():
        for n, prm in tiny_embedder.encoder.named_parameters():
            if "experts" in n:
                prm.add_(torch.randn_like(prm) * 0.2)
    tiny_embedder.save_pretrained(tmp_path / "moe")
    p = run_job("--compare", "tiny", str(tmp_path / "moe"), "--data", "pkg://ko_help", "--split", "dev",
                "--summary", str(summary))
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(summary.read_text())
    cmp = s["comparison"]
    assert cmp["diff"] == pytest.approx(cmp["mean_b"] - cmp["mean_a"]) and 0 <= cmp["p_value"] <= 1
    assert cmp["mean_a"] != cmp["mean_b"]
    assert "paired t-test p =" in p.stdout


def test_evaluate_job_bad_input_exits_2(tmp_path):
    p = run_in_process("evaluate.py", "--model", "tiny", "--data", str(tmp_path / "nope"))
    assert p.returncode == 2 and "evaluation data folder not found" in p.stderr and "Traceback" not in p.stderr
    p = run_in_process("evaluate.py", "--model", str(tmp_path / "no-model"), "--data", "pkg://ko_help")
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = run_in_process("evaluate.py", "--lang", "xx", "--model", "tiny")
    assert p.returncode == 2 and "known languages: fa, hi, ko" in p.stderr
    p = run_in_process("evaluate.py", "--lang", "hi", "--set", "eval.batch_size=0", "--print-config")
    assert p.returncode == 2 and "--set eval.batch_size=0: eval.batch_size: Input should be greater than or equal to 1" in p.stderr
    p = run_in_process("evaluate.py", "--lang", "hi", "--profile", "tiny", "--print-config")
    assert p.returncode == 0 and "name_or_path: tiny" in p.stdout and "data_dir: pkg://ko_help" in p.stdout
    # Outputs that cannot be written fail before the work, not after it (here: a path below a file).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for flag in ("--summary", "--run-file"):
        p = run_in_process("evaluate.py", "--model", "tiny", "--data", "pkg://ko_help", flag, str(blocker / "out.json"))
        assert p.returncode == 2 and "Traceback" not in p.stderr and "evaluation set" not in p.stderr
        assert f"error: {flag}: cannot write to {blocker / 'out.json'} ({blocker} is a file, not a folder)" in p.stderr


def test_graded_and_bom_inputs(tmp_path):
    root = _beir(tmp_path, [("q1", "d1", 2), ("q1", "d2", "1.0")])
    data = load_beir(root, "test")
    assert data.qrels == {"q1": {"d1": 2, "d2": 1}}  # integer grades, also written as 1.0
    qrels = root / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "q1\td3\t0.5\n")
    with pytest.raises(DataError, match=r"test.tsv:4: relevance '0.5' is not an integer grade"):
        load_beir(root, "test")  # truncating it to 0 would make a judged-relevant page non-relevant
    qrels.write_bytes(b"\xef\xbb\xbf" + b"query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    for name in ("corpus.jsonl", "queries.jsonl"):
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())
    data = load_beir(root, "test")  # byte order marks at the start of each file are not part of the data
    assert data.qrels == {"q1": {"d1": 1}} and data.corpus["d1"] == "T text d1"
