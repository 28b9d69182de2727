import json
import subprocess
import sys

import pytest
import torch

from clp_ray.data import (
    Collator,
    load_records,
    rank_batches,
    sample_group,
    shard_indices,
    split_train_dev,
    validate,
)
from clp_ray.errors import DataError
from clp_ray.model.settings import EmbedSettings

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "neg_q": ["nq1", "nq2"]}

LONG = json.dumps({**GOOD, "query": "x" * 300}).encode()
# (line content, expected "field: reason") -- one bad record of every kind.
BAD_LINES = [
    (b'{"query": "q", "pos": ["p"]', "<line>: malformed JSON: Expecting ',' delimiter (column 28)"),
    (b'["not", "an", "object"]', "<record>: must be a JSON object, got list"),
    (json.dumps({"pos": ["p"], "neg": ["n"], "neg_q": ["x"]}).encode(), "query: missing field"),
    (json.dumps({**GOOD, "query": 3}).encode(), "query: must be a string, got int"),
    (json.dumps({**GOOD, "query": "  "}).encode(), "query: empty string"),
    (json.dumps({**GOOD, "pos": []}).encode(), "pos: empty list"),
    (json.dumps({**GOOD, "pos": "p"}).encode(), "pos: must be a list of strings, got str"),
    (json.dumps({**GOOD, "neg": ["n1", ""]}).encode(), "neg: item 1 is an empty string"),
    (json.dumps({**GOOD, "neg_q": ["only one"]}).encode(), "neg_q: length 1 differs from neg length 2"),
    (json.dumps({**GOOD, "pos_scores": [1.0, 2.0]}).encode(), "pos_scores: length 2 differs from pos length 1"),
    (json.dumps({**GOOD, "neg_scores": ["a", "b"]}).encode(), "neg_scores: must be a list of numbers"),
    ('{"query": "caf\xe9"}'.encode("latin-1"), "<line>: invalid UTF-8 at byte 14"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "neg_q"}).encode(),
     "neg_q: missing while loss.lam > 0 (set lam to 0 for plain contrastive data)"),
    (LONG, f"<line>: line is {len(LONG) + 1} bytes, longer than data.max_line_bytes = 200"),
]


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.fixture()
def mixed(tmp_path):
    good = json.dumps(GOOD).encode()
    lines = []
    for bad, _ in BAD_LINES:
        lines += [good, bad]
    return write_lines(tmp_path / "train.jsonl", lines + [b"", good])


def test_every_bad_record_kind_under_error(mixed):
    with pytest.raises(DataError) as e:
        validate([str(mixed)], require_neg_q=True, group_size=3, max_line_bytes=200)
    msg = str(e.value)
    assert msg.startswith(f"{len(BAD_LINES)} bad record(s) in the training data")
    for i, (_, expected) in enumerate(BAD_LINES):
        assert f"{mixed}:{2 * i + 2}: {expected}" in msg
    assert f"{len(BAD_LINES) * 2 + 1} records: {len(BAD_LINES) + 1} good, {len(BAD_LINES)} bad, 1 blank lines ignored" in msg


def test_error_lists_first_20_and_total(tmp_path):
    f = write_lines(tmp_path / "t.jsonl", [b"{"] * 25)
    with pytest.raises(DataError) as e:
        validate([str(f)])
    msg = str(e.value)
    assert f"{f}:20: <line>: malformed JSON" in msg and f"{f}:21:" not in msg
    assert "... and 5 more" in msg and "25 bad record(s)" in msg


def test_skip_writes_rejects_and_keeps_good_records(mixed, tmp_path):
    rejects = tmp_path / "out" / "rejects.jsonl"
    report = validate([str(mixed)], require_neg_q=True, group_size=3, max_line_bytes=200, on_bad_record="skip", rejects_path=rejects)
    assert (report.good, report.bad, report.blank_lines) == (len(BAD_LINES) + 1, len(BAD_LINES), 1)
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [f"{r['field']}: {r['reason']}" for r in rows] == [exp for _, exp in BAD_LINES]
    assert [r["line"] for r in rows] == [2 * i + 2 for i in range(len(BAD_LINES))]
    assert rows[3]["raw"] == BAD_LINES[3][0].decode()
    assert "query: must be a string" in report.text()
    assert sum(report.counts().values()) == len(BAD_LINES)


def test_good_file_round_trips_through_datasets(tmp_path):
    records = [
        {"query": f"질문 {i}", "pos": [f"p{i}", f"p{i}b"], "neg": [f"n{i}{j}" for j in range(3)],
         "neg_q": [f"nq{i}{j}" for j in range(3)], "pos_scores": [1.0, 0.5], "neg_scores": [0.1, 0.2, 0.3]}
        for i in range(7)
    ]
    records.append({"query": "no scores", "pos": ["p"], "neg": ["n"], "neg_q": ["m"]})
    f = tmp_path / "d" / "a.jsonl"
    f.parent.mkdir()
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    report = validate([str(f.parent)], require_neg_q=True)  # a folder works too
    ds = load_records(report, require_neg_q=True, group_size=2, max_line_bytes=10**6, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 8
    for rec, row in zip(records, ds):
        for key in ("query", "pos", "neg", "neg_q"):
            assert row[key] == rec[key]
        assert row["pos_scores"] == pytest.approx(rec.get("pos_scores", []))
    # Same bytes -> same hash; changed bytes -> new hash (and a new datasets cache entry).
    assert validate([str(f)], require_neg_q=True).content_hash == report.content_hash
    f.write_text(f.read_text().replace("질문 0", "질문 zero"), encoding="utf-8")
    report2 = validate([str(f)], require_neg_q=True)
    assert report2.content_hash != report.content_hash
    ds2 = load_records(report2, require_neg_q=True, group_size=2, max_line_bytes=10**6, cache_dir=str(tmp_path / "cache"))
    assert ds2[0]["query"] == "질문 zero"


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        validate([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl:0: <file>: empty file \(no records\)"):
        validate([str(tmp_path / "empty.jsonl")])
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="folder has no"):
        validate([str(tmp_path / "dir")])
    with pytest.raises(DataError, match="empty"):
        validate([])


def test_cli_exit_codes(mixed, tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(GOOD).encode()] * 3)
    ok = subprocess.run([sys.executable, "-m", "clp_ray.data", str(good), "--lam", "0.1"], capture_output=True, text=True)
    assert ok.returncode == 0 and "3 records: 3 good, 0 bad" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "clp_ray.data", str(mixed), "--lam", "0.1", "--max-line-bytes", "200"],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"{mixed}:4: <record>: must be a JSON object, got list" in bad.stdout
    assert f"{len(BAD_LINES)} bad" in bad.stdout


def _aligned_records(n, n_neg=6):
    return [{"query": f"q{i}", "pos": [f"q{i}-pos{j}" for j in range(2)], "neg": [f"n{i}-{j}" for j in range(n_neg)],
             "neg_q": [f"query-of-n{i}-{j}" for j in range(n_neg)]} for i in range(n)]


def test_groups_keep_neg_q_aligned_and_are_deterministic():
    recs = _aligned_records(5)
    groups = [sample_group(r, 4, seed=1, epoch=0, index=i) for i, r in enumerate(recs)]
    for i, g in enumerate(groups):
        assert g.passages[0].startswith(f"q{i}-pos") and len(g.passages) == 4 and len(set(g.passages[1:])) == 3
        assert g.neg_queries == [f"query-of-{n}" for n in g.passages[1:]]
    again = [sample_group(r, 4, seed=1, epoch=0, index=i) for i, r in enumerate(recs)]
    assert again == groups
    other_epoch = [sample_group(r, 4, seed=1, epoch=1, index=i) for i, r in enumerate(recs)]
    assert other_epoch != groups
    few = sample_group(_aligned_records(1, n_neg=2)[0], 6, seed=0, epoch=0, index=0)  # with replacement
    assert len(few.passages) == 6 and few.neg_queries == [f"query-of-{n}" for n in few.passages[1:]]


def test_collator_batches_align(tiny_embedder):
    recs = _aligned_records(3)
    groups = [sample_group(r, 3, seed=0, epoch=0, index=i) for i, r in enumerate(recs)]
    batch = Collator(tiny_embedder.tokenizer, EmbedSettings(query_max_len=8, passage_max_len=16))(groups)
    assert batch["query"]["input_ids"].shape[0] == 3
    assert batch["passage"]["input_ids"].shape[0] == 9 and batch["passage"]["input_ids"].shape[1] <= 16
    assert batch["neg_query"]["input_ids"].shape[0] == 6 and batch["group_size"] == 3
    expected = tiny_embedder.tokenizer([q for g in groups for q in g.neg_queries], padding=True, truncation=True,
                                       max_length=8, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["neg_query"]["input_ids"], expected)  # in the same order as the negatives


def test_length_buckets_give_the_same_embeddings_with_less_padding(tiny_embedder):
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings

    groups = [sample_group(r, 4, seed=0, epoch=0, index=i) for i, r in enumerate(_aligned_records(3))]
    groups[0].passages[1] = "a much longer negative passage " * 6
    plain = Collator(tiny_embedder.tokenizer, EmbedSettings(query_max_len=16, passage_max_len=64))(groups)["passage"]
    buck = Collator(tiny_embedder.tokenizer, EmbedSettings(query_max_len=16, passage_max_len=64), bucket_size=4)(groups)["passage"]
    assert sum(c["input_ids"].numel() for c in buck.chunks) < plain["input_ids"].numel()
    assert buck.num_tokens == int(plain["attention_mask"].sum())
    module = CLPObjective(tiny_embedder.eval(), LossSettings(temperature=0.05, lam=0.0, cross_device=False))
    with torch.no_grad():
        torch.testing.assert_close(module.encode(buck).emb, module.encode(plain).emb, rtol=0, atol=1e-5)


def test_sharding_covers_each_example_once_per_epoch():
    n, world = 23, 2
    for epoch in (0, 1):
        shards = [shard_indices(n, rank=r, world=world, seed=7, epoch=epoch) for r in range(world)]
        assert sorted(shards[0] + shards[1]) == list(range(n))
        batches = [rank_batches(n, rank=r, world=world, batch_size=4, seed=7, epoch=epoch) for r in range(world)]
        assert len(batches[0]) == len(batches[1]) == 3  # equal steps on every rank
        assert all(len(b) == 4 for bs in batches for b in bs)
        for r in range(world):
            flat = [i for b in batches[r] for i in b]
            assert flat[: len(shards[r])] == shards[r]  # padding only wraps around at the end
    assert shard_indices(n, rank=0, world=2, seed=7, epoch=0) != shard_indices(n, rank=0, world=2, seed=7, epoch=1)


def test_train_dev_split_is_seeded_and_query_disjoint(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list(_aligned_records(200))
    train, dev = split_train_dev(ds, 0.2, seed=3)
    assert len(train) + len(dev) == 200 and 20 <= len(dev) <= 60
    assert not set(train["query"]) & set(dev["query"])
    train2, dev2 = split_train_dev(ds.shuffle(seed=1), 0.2, seed=3)
    assert sorted(dev2["query"]) == sorted(dev["query"])  # depends on the queries, not their order
    with pytest.raises(DataError, match="empty dev split"):
        split_train_dev(ds.select(range(1)), 0.01, seed=3)


def test_document_disjoint_dev_split_shares_no_positive_with_training():
    """The bundled sample's pages have several keywords each: split by query, dev queries reuse
    training positives (the dev metric rewards memorised pages); split by document, none does."""
    from clp_ray.config import resolve_path

    report = validate([resolve_path("pkg://ko_help/train.jsonl")], require_neg_q=True, group_size=2)
    ds = load_records(report, require_neg_q=True, group_size=2, max_line_bytes=1_000_000)
    train_q, dev_q = split_train_dev(ds, 0.2, seed=42, by="queries")
    assert {p for ps in dev_q["pos"] for p in ps} & {p for ps in train_q["pos"] for p in ps}  # the leak
    train, dev = split_train_dev(ds, 0.2, seed=42, by="documents")
    dev_pos = {p for ps in dev["pos"] for p in ps}
    assert len(dev) >= 40 and not dev_pos & {p for ps in train["pos"] for p in ps}
    assert len(train) + len(dev) <= len(ds)  # records with positives on both sides are left out
    again, dev2 = split_train_dev(ds.shuffle(seed=1), 0.2, seed=42, by="documents")
    assert sorted(dev2["query"]) == sorted(dev["query"]) and len(again) == len(train)
    with pytest.raises(ValueError, match="dev split must be by 'queries' or 'documents'"):
        split_train_dev(ds, 0.2, seed=42, by="pages")


def test_bundled_sample_is_valid_and_document_disjoint():
    from clp_ray.config import resolve_path
    from clp_ray.evaluation import load_beir

    report = validate([resolve_path("pkg://ko_help/train.jsonl")], require_neg_q=True, group_size=4)
    assert report.bad == 0 and report.good >= 300
    dev, test = load_beir("pkg://ko_help", "dev"), load_beir("pkg://ko_help", "test")
    dev_docs = {d for q in dev.qrels.values() for d in q}
    test_docs = {d for q in test.qrels.values() for d in q}
    assert dev_docs and test_docs and not dev_docs & test_docs
    train_texts = {json.loads(line)["pos"][0] for line in open(resolve_path("pkg://ko_help/train.jsonl"), encoding="utf-8")}
    assert not train_texts & {dev.corpus[d] for d in dev_docs | test_docs}
