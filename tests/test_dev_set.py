"""The dev set that selection runs on (clp_ray/evaluation/dev_set.py): full-corpus, never trained on, never
the test split; and the bundled samples' languages (clp_ray/data/samples.py)."""

import json
import shutil

import pytest
import torch
from conftest import run_in_process

from clp_ray.config import load_config, resolve_path
from clp_ray.errors import ConfigError, DataError
from clp_ray.evaluation import load_beir


def records_of(cfg):
    from clp_ray.data import load_records, validate

    report = validate(cfg.data.train_paths, require_neg_q=cfg.loss.lam > 0, group_size=cfg.data.train_group_size)
    return load_records(report, require_neg_q=cfg.loss.lam > 0, group_size=cfg.data.train_group_size, max_line_bytes=cfg.data.max_line_bytes)


def dev_of(cfg):
    from clp_ray.evaluation.dev_set import build_dev_set, training_split

    train, heldout = training_split(records_of(cfg), cfg)
    return train, heldout, build_dev_set(cfg, train, heldout)


@pytest.fixture(scope="module")
def test_set():
    return load_beir("pkg://ko_help", "test")


def test_bundled_dev_qrels_are_searched_against_the_full_corpus(test_set):
    cfg = load_config("ko", "local")
    train, heldout, dev = dev_of(cfg)
    corpus, qrels = dev.retrieval.corpus, load_beir("pkg://ko_help", "dev").qrels
    # Full corpus: a dev corpus smaller than the evaluation corpus fails here.
    assert dev.info.corpus_size == len(corpus) >= len(test_set.corpus) == 1519
    assert corpus == test_set.corpus and not dev.info.sampled
    assert dev.info.source == "qrels" and dev.retrieval.qrels == qrels and dev.info.queries == len(qrels) == 920
    assert len(train) == 500 and len(heldout) == 0  # the dev queries come from qrels: every record trains
    # Never trained on, never the test split.
    assert not set(dev.retrieval.queries.values()) & set(train["query"])
    assert not set(dev.retrieval.queries) & set(test_set.queries)
    judged = {d for rel in dev.retrieval.qrels.values() for d in rel}
    assert not judged & {d for rel in test_set.qrels.values() for d in rel}
    assert dev.info.to_dict()["corpus_size"] == 1519 and dev.info.as_params()["dev_set.queries"] == 920


def test_heldout_queries_are_searched_against_the_corpus_plus_training_passages(test_set):
    cfg = load_config("ko", "local", ["eval.dev_source=heldout"])
    train, heldout, dev = dev_of(cfg)
    assert dev.info.source == "heldout" and len(heldout) == dev.info.queries > 0
    corpus = dev.retrieval.corpus
    # Everything the evaluation corpus has, under its own ids, plus every training passage.
    assert {d: corpus[d] for d in test_set.corpus} == test_set.corpus
    texts = {t.strip() for t in corpus.values()}
    for ds in (train, heldout):
        for pos, neg in zip(ds["pos"], ds["neg"]):
            assert {t.strip() for t in (*pos, *neg)} <= texts
    assert dev.info.corpus_size >= len(test_set.corpus)
    # Each held-out query's positives are judged under the evaluation corpus's own ids.
    by_text = {t.strip(): d for d, t in test_set.corpus.items()}
    for i, (query, pos) in enumerate(zip(heldout["query"], heldout["pos"])):
        assert dev.retrieval.queries[f"heldout-{i}"] == query and query not in set(train["query"])
        assert set(dev.retrieval.qrels[f"heldout-{i}"]) == {by_text[t.strip()] for t in pos}


def test_the_old_records_only_dev_set_is_what_this_replaces():
    """Today's dev set is ~40 queries over the few passages of their own records."""
    from clp_ray.evaluation.dev_set import dev_retrieval_set

    cfg = load_config("ko", "local", ["eval.dev_source=heldout"])
    _, heldout, dev = dev_of(cfg)
    old = dev_retrieval_set(heldout)
    assert len(old.corpus) < 250 and dev.info.corpus_size > 6 * len(old.corpus)


def test_auto_source_and_its_guards(tmp_path):
    from clp_ray.evaluation.dev_set import resolve_dev_source

    assert resolve_dev_source(load_config("ko", "tiny")) == "qrels"
    # No dev qrels in the evaluation folder: held-out records.
    beir = tmp_path / "beir"
    shutil.copytree(resolve_path("pkg://ko_help"), beir, ignore=shutil.ignore_patterns("train.jsonl", "sample.json"))
    (beir / "qrels" / "dev.tsv").unlink()
    assert resolve_dev_source(load_config("ko", "tiny", [f"eval.data_dir={beir}"])) == "heldout"
    # The dev split may never be the test split (MIRACL users often test on its `dev` split).
    assert resolve_dev_source(load_config("ko", "tiny", ["eval.test_split=dev"])) == "heldout"
    with pytest.raises(ConfigError, match=r"eval.dev_split = dev .* is the test split .*never feeds selection"):
        resolve_dev_source(load_config("ko", "tiny", ["eval.test_split=dev", "eval.dev_source=qrels"]))
    with pytest.raises(ConfigError, match=r"eval.dev_source = qrels .* needs eval.data_dir"):
        resolve_dev_source(load_config("ko", "tiny", ["eval.data_dir=null", "eval.dev_source=qrels"]))
    # Held out with nothing held out: a clear error, not an empty dev set.
    with pytest.raises(ConfigError, match=r"data.dev_fraction = 0.*no held-out queries"):
        dev_of(load_config("ko", "tiny", ["eval.dev_source=heldout", "data.dev_fraction=0"]))


def test_without_an_evaluation_set_heldout_searches_every_training_passage():
    cfg = load_config("ko", "tiny", ["eval.data_dir=null", "data.dev_fraction=0.1"])
    train, heldout, dev = dev_of(cfg)
    passages = {t.strip() for ds in (train, heldout) for pos, neg in zip(ds["pos"], ds["neg"]) for t in (*pos, *neg)}
    assert dev.info.source == "heldout" and {t.strip() for t in dev.retrieval.corpus.values()} == passages


def test_dev_queries_that_are_training_queries_are_left_out(tmp_path):
    dev = load_beir("pkg://ko_help", "dev")
    first = next(iter(dev.queries.values()))
    rec = json.loads(open(resolve_path("pkg://ko_help/train.jsonl"), encoding="utf-8").readline())
    data = tmp_path / "train.jsonl"
    data.write_text(open(resolve_path("pkg://ko_help/train.jsonl"), encoding="utf-8").read()
                    + json.dumps({**rec, "query": first}, ensure_ascii=False) + "\n", encoding="utf-8")
    _, _, got = dev_of(load_config("ko", "tiny", [f"data.train_paths=[{data}]"]))
    same = sum(t == first for t in dev.queries.values())
    assert got.info.skipped_queries == same >= 1 and got.info.queries == len(dev.queries) - same
    assert first not in got.retrieval.queries.values()


def test_corpus_sample_keeps_every_judged_passage_seeded():
    from clp_ray.evaluation.dev_set import sample_corpus

    cfg = load_config("ko", "tiny", ["eval.dev_corpus_sample=300"])
    _, _, dev = dev_of(cfg)
    judged = {d for rel in dev.retrieval.qrels.values() for d in rel}
    assert judged <= set(dev.retrieval.corpus) and dev.info.corpus_size == len(judged) + 300
    assert dev.info.sampled and dev.info.full_corpus_size == 1519 and "sample of" in dev.info.name
    full = load_beir("pkg://ko_help", "dev")
    assert sample_corpus(full, 300, cfg.data.seed).corpus == dev.retrieval.corpus  # seeded: the same again
    assert sample_corpus(full, 300, cfg.data.seed + 1).corpus != dev.retrieval.corpus
    assert sample_corpus(full, 10**6, 0).corpus == full.corpus  # more than there is: all of it


def test_prepare_records_the_dev_set(tmp_path):
    from clp_ray.train import prepare

    prep = prepare(load_config("ko", "tiny", [f"train.output_dir={tmp_path}",
                                              f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]))
    assert prep.train_records == 500 and prep.dev.info.corpus_size == 1519 and prep.dev.info.queries == 920


# ----------------------------------------------------------------------------- languages of the samples


def test_a_bundled_sample_is_used_only_for_its_language(tmp_path):
    from clp_ray.data.samples import bundled_samples, check_data_language

    assert [(s.name, s.lang) for s in bundled_samples()] == [("ko_help", "ko")]
    check_data_language(load_config("ko", "local"))
    for lang in ("hi", "fa"):
        with pytest.raises(ConfigError, match=rf"--lang {lang}: data.train_paths = .*pkg://ko_help.* is the bundled "
                                              rf"Korean \(ko\) sample.*eval.data_dir=miracl://{lang}"):
            check_data_language(load_config(lang, "local"))
    # The user's own data for the language passes; the profile's Korean evaluation set alone does not.
    own = [f"data.train_paths=[{tmp_path / 'hi.jsonl'}]"]
    with pytest.raises(ConfigError, match=r"eval.data_dir = pkg://ko_help"):
        check_data_language(load_config("hi", "local", own))
    check_data_language(load_config("hi", "local", [*own, f"eval.data_dir={tmp_path}"]))
    check_data_language(load_config("hi", "cluster"))  # the production profile names no bundled sample


@pytest.mark.parametrize("job,lang", [("tune.py", "hi"), ("tune.py", "fa"), ("train.py", "hi"), ("ablate.py", "fa")])
def test_a_language_without_data_exits_2_before_any_work(job, lang):
    p = run_in_process(job, "--lang", lang, "--profile", "local")
    assert p.returncode == 2, p.stderr
    assert f"--lang {lang}: data.train_paths" in p.stderr and "Korean (ko) sample" in p.stderr
    assert "Traceback" not in p.stderr and f"miracl://{lang}" in p.stderr


# ----------------------------------------------------------------------------- encoding split over ranks


def _rank(rank, world, port, tiny_path, texts, results):
    import os

    import torch.distributed as dist

    from clp_ray.evaluation.rank_encode import RankShardedEncoder
    from clp_ray.model.embedder import Embedder

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    emb = Embedder.from_pretrained(tiny_path)
    results[rank] = RankShardedEncoder(emb, rank, world).encode(texts, kind="passage", batch_size=4)
    dist.destroy_process_group()


def test_rank_sharded_encoding_equals_encoding_everything(tiny_path):
    import socket

    import torch.multiprocessing as mp

    from clp_ray.model.embedder import Embedder

    texts = list(load_beir("pkg://ko_help", "dev").corpus.values())[:37]  # not a multiple of the batch or the world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, tiny_path, texts, results), nprocs=2, join=True)
    torch.set_num_threads(1)
    full = Embedder.from_pretrained(tiny_path).encode(texts, kind="passage", batch_size=4)
    for rank in range(2):
        assert results[rank].shape == full.shape
        assert torch.allclose(results[rank], full, atol=1e-5), (rank, float((results[rank] - full).abs().max()))


def test_a_dev_set_with_no_queries_left_is_an_error(tmp_path):
    from clp_ray.evaluation.dev_set import _without_trained_queries

    dev = load_beir("pkg://ko_help", "dev")
    with pytest.raises(DataError, match="every one of its 920 queries is also a training query"):
        _without_trained_queries(dev, set(dev.queries.values()))
