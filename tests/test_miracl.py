"""miracl://<lang> reads MIRACL's published files (no loading script): a local tree that mirrors
the two hub repos file for file (names, TSV columns, gzipped JSONL shards), through the same code
path as the hub, with the root pointed at it."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clp_ray.errors import DataError
from clp_ray.evaluation import load_beir

ROOT = Path(__file__).resolve().parents[1]

PASSAGES = {  # docid -> (title, text); MIRACL's "X#Y" ids: passage Y of article X
    "10#0": ("दिल्ली", "दिल्ली भारत की राजधानी है।"), "10#1": ("दिल्ली", "दिल्ली में यमुना नदी बहती है।"),
    "11#0": ("मुंबई", "मुंबई महाराष्ट्र की राजधानी है।"), "11#1": ("मुंबई", "मुंबई एक बंदरगाह शहर है।"),
    "12#0": ("गंगा", "गंगा भारत की सबसे लंबी नदी है।"), "12#1": ("गंगा", "गंगा हिमालय से निकलती है।"),
    "13#0": ("चाय", "चाय असम में उगाई जाती है।"), "13#1": ("चाय", "भारत में चाय बहुत पी जाती है।"),
}
TOPICS = {
    "train": {"1": "भारत की राजधानी क्या है?", "2": "महाराष्ट्र की राजधानी", "3": "सबसे लंबी नदी", "4": "चाय कहाँ उगाई जाती है"},
    "dev": {"7": "यमुना नदी कहाँ बहती है", "8": "बंदरगाह शहर"},
    "test-b": {"9": "हिमालय से कौन सी नदी निकलती है"},  # topics only: test-b has no public judgements
}
QRELS = {
    "train": [("1", "10#0", 1), ("1", "11#0", 0), ("2", "11#0", 1), ("2", "10#0", 0), ("3", "12#0", 1),
              ("3", "10#1", 0), ("4", "13#0", 1), ("4", "13#1", 0)],
    "dev": [("7", "10#1", 1), ("7", "12#0", 0), ("8", "11#1", 1)],
}


def miracl_tree(root: Path, lang: str = "hi") -> Path:
    topics = root / "miracl" / "miracl" / f"miracl-v1.0-{lang}" / "topics"
    qrels = root / "miracl" / "miracl" / f"miracl-v1.0-{lang}" / "qrels"
    corpus = root / "miracl" / "miracl-corpus" / f"miracl-corpus-v1.0-{lang}"
    for d in (topics, qrels, corpus):
        d.mkdir(parents=True)
    for split, rows in TOPICS.items():
        (topics / f"topics.miracl-v1.0-{lang}-{split}.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in rows.items()))
    for split, rows in QRELS.items():
        (qrels / f"qrels.miracl-v1.0-{lang}-{split}.tsv").write_text("".join(f"{q}\tQ0\t{d}\t{r}\n" for q, d, r in rows))
    ids = sorted(PASSAGES)
    for shard, part in enumerate((ids[:5], ids[5:])):  # two shards, as the corpus is published
        with gzip.open(corpus / f"docs-{shard}.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in part:
                f.write(json.dumps({"docid": d, "title": PASSAGES[d][0], "text": PASSAGES[d][1]}, ensure_ascii=False) + "\n")
    return root


@pytest.fixture()
def tree(tmp_path):
    return miracl_tree(tmp_path / "mirror")


@pytest.mark.parametrize("split", ["train", "dev"])
def test_splits_load_with_judged_negatives_kept(tree, split):
    data = load_beir("miracl://hi", split, miracl_root=str(tree))
    assert data.name == f"miracl-hi/{split}"
    assert data.queries == {q: TOPICS[split][q] for q in sorted({q for q, _, _ in QRELS[split]})}
    assert data.qrels == {q: {d: r for qq, d, r in QRELS[split] if qq == q} for q in data.queries}
    assert data.corpus == {d: f"{t} {x}" for d, (t, x) in PASSAGES.items()}  # both shards, title + text
    assert 0 in {r for rels in data.qrels.values() for r in rels.values()}  # judged non-relevant stays 0


def test_errors_say_what_is_missing(tree, tmp_path):
    with pytest.raises(DataError, match=r"no judged split 'test-b' .*\(judged splits: dev, train\)"):
        load_beir("miracl://hi", "testB", miracl_root=str(tree))
    with pytest.raises(DataError, match=r"MIRACL has no language 'xx'"):
        load_beir("miracl://xx", "dev", miracl_root=str(tree))
    qrels = tree / "miracl/miracl/miracl-v1.0-hi/qrels/qrels.miracl-v1.0-hi-dev.tsv"
    qrels.write_text(qrels.read_text() + "8\tQ0\t99#0\t1\n")
    with pytest.raises(DataError, match=r"1 unknown passage id\(s\) \['99#0'\]"):
        load_beir("miracl://hi", "dev", miracl_root=str(tree))
    qrels.write_text("7 10#1 1\n")
    with pytest.raises(DataError, match=r"qrels.miracl-v1.0-hi-dev.tsv:1: expected query-id<TAB>Q0"):
        load_beir("miracl://hi", "dev", miracl_root=str(tree))


def test_without_the_hub_the_error_is_clear(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load MIRACL 'hi' split 'dev' from the Hugging Face hub"):
        load_beir("miracl://hi", "dev")


@pytest.mark.slow
def test_mine_job_takes_neg_q_from_miracl_judgements(tree, tmp_path):
    out, summary = tmp_path / "train.jsonl", tmp_path / "s.json"
    p = subprocess.run([sys.executable, "jobs/mine.py", "--lang", "hi", "--profile", "tiny", "--model", "tiny",
                        "--data", "miracl://hi", "--split", "train", "--out", str(out), "--summary", str(summary),
                        "--set", f"eval.miracl_root={tree}", "--set", "mining.margin_mode=absolute",
                        "--set", "mining.margin=0", "--set", "mining.rank_window=[1, 8]", "--set", "mining.top_k=8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    s = json.loads(summary.read_text())
    queries = TOPICS["train"]
    positives = {q: {d for qq, d, r in QRELS["train"] if qq == q and r > 0} for q in queries}
    owners = {f"{PASSAGES[d][0]} {PASSAGES[d][1]}": queries[q] for q, ds in positives.items() for d in ds}
    assert records and s["neg_q_from_qrels"] == s["negatives"] > 0
    for rec in records:
        assert rec["neg"] and len(rec["neg"]) == len(rec["neg_q"])
        for neg, neg_q in zip(rec["neg"], rec["neg_q"]):
            assert owners[neg] == neg_q != rec["query"]  # the negative's own judged query
