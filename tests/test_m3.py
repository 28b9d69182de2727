"""BGE-M3's sparse and ColBERT heads: loading and saving them, the three modes against a naive
per-token reference and against FlagEmbedding itself, hybrid search, and the unified loss."""

import importlib.util
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clp_ray.config import TinyModelConfig
from clp_ray.errors import ClpRayError
from clp_ray.model.embedder import Embedder
from clp_ray.model.m3 import COLBERT_FILE, SPARSE_FILE, ModeOutput, colbert_scores, sparse_scores, unused_token_ids

TEXTS = ["셀 보호 해제 방법", "차트 데이터 범위를 바꾸는 방법과 서식 차트 차트", "x", "How do I insert rows above?",
         "피벗 테이블 " * 60]


@pytest.fixture(scope="module")
def m3_path():
    from clp_ray.model.tiny import tiny_model_path

    return tiny_model_path(TinyModelConfig(m3_heads=True))


@pytest.fixture()
def m3(m3_path):
    return Embedder.from_pretrained(m3_path)


def flag_embedding():
    """FlagEmbedding's M3 modules. Its package ``__init__`` imports every model it has, and one
    reranker needs a transformers < 5 module, so only the M3 parts are imported (the package
    objects are made without running their ``__init__``)."""
    spec = importlib.util.find_spec("FlagEmbedding")
    if spec is None:
        pytest.skip("FlagEmbedding is not installed")
    root = spec.submodule_search_locations[0]
    for name, sub in (("FlagEmbedding", ""), ("FlagEmbedding.inference", "/inference")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [root + sub]
            sys.modules[name] = pkg
    from FlagEmbedding.inference.embedder.encoder_only.m3 import M3Embedder

    return M3Embedder


# ------------------------------------------------------------------------------ naive references


def naive_lexical(emb: Embedder, text: str, kind: str = "passage") -> dict[int, float]:
    """Token by token: ReLU(sparse_linear(h_t)), the max per id, special tokens dropped."""
    enc = emb.tokenize([text], kind=kind)
    with torch.no_grad():
        hidden = emb.encoder(**enc).last_hidden_state[0]
    skip = set(unused_token_ids(emb.tokenizer))
    out: dict[int, float] = {}
    lin = emb.heads.sparse_linear
    for t, tok in enumerate(enc["input_ids"][0].tolist()):
        w = max(float((lin.weight[0] @ hidden[t] + lin.bias[0]).detach()), 0.0)
        if tok not in skip and w > 0:
            out[tok] = max(out.get(tok, 0.0), w)
    return out


def naive_colbert(emb: Embedder, text: str, kind: str = "passage") -> torch.Tensor:
    enc = emb.tokenize([text], kind=kind)
    with torch.no_grad():
        hidden = emb.encoder(**enc).last_hidden_state[0]
        lin = emb.heads.colbert_linear
        rows = [lin.weight @ hidden[t] + lin.bias for t in range(1, hidden.shape[0])]
    return torch.stack([r / r.norm() for r in rows])


def naive_maxsim(q: torch.Tensor, d: torch.Tensor) -> float:
    return sum(max(float(qt @ dt) for dt in d) for qt in q) / len(q)


def naive_lexical_score(a: dict, b: dict) -> float:
    return sum(w * b[t] for t, w in a.items() if t in b)


# ------------------------------------------------------------------------------ load / save


def test_heads_load_and_modes(m3, tiny_embedder):
    assert m3.modes == ("dense", "sparse", "colbert")
    assert m3.heads.sparse_linear.weight.shape == (1, m3.dim) and m3.heads.colbert_dim == m3.dim
    assert tiny_embedder.heads is None and tiny_embedder.modes == ("dense",)
    with pytest.raises(ClpRayError, match="no sparse head"):
        tiny_embedder.encode(["a"], output="sparse")
    with pytest.raises(ValueError, match="output must be"):
        m3.encode(["a"], output="lexical")


def test_save_round_trip_is_byte_identical_and_survives_a_bf16_cast(m3, m3_path, tmp_path):
    m3.save_pretrained(tmp_path / "a")
    for f in (SPARSE_FILE, COLBERT_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (m3_path / f).read_bytes()
    again = Embedder.from_pretrained(tmp_path / "a")
    for mode in ("dense", "sparse", "colbert"):
        a, b = m3.encode(TEXTS, output=mode), again.encode(TEXTS, output=mode)
        assert (torch.equal(a, b) if mode == "dense" else
                all((x == y) if mode == "sparse" else torch.equal(x, y) for x, y in zip(a, b)))
    # A training copy in bf16 that left the heads alone still writes the original files.
    m3.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert (tmp_path / "bf16" / COLBERT_FILE).read_bytes() == (m3_path / COLBERT_FILE).read_bytes()


def test_changed_heads_are_saved_with_their_new_values(m3, tmp_path):
    with torch.no_grad():
        m3.heads.colbert_linear.weight.add_(0.5)
    m3.save_pretrained(tmp_path / "m")
    state = torch.load(tmp_path / "m" / COLBERT_FILE, weights_only=True)
    assert torch.equal(state["weight"], m3.heads.colbert_linear.weight)
    assert torch.equal(Embedder.from_pretrained(tmp_path / "m").heads.colbert_linear.weight, m3.heads.colbert_linear.weight)


def test_model_without_heads_saves_none(tiny_embedder, tmp_path):
    tiny_embedder.save_pretrained(tmp_path / "d")
    assert not (tmp_path / "d" / SPARSE_FILE).exists() and not (tmp_path / "d" / COLBERT_FILE).exists()


def test_half_a_pair_or_a_misfit_head_is_an_error_naming_the_file(m3_path, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(m3_path, one)
    (one / COLBERT_FILE).unlink()
    with pytest.raises(ClpRayError, match=f"has {SPARSE_FILE} but not {COLBERT_FILE}"):
        Embedder.from_pretrained(one)
    bad = tmp_path / "bad"
    shutil.copytree(m3_path, bad)
    torch.save({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, bad / SPARSE_FILE)
    with pytest.raises(ClpRayError, match=rf"{SPARSE_FILE}: weight \[1, 7\]"):
        Embedder.from_pretrained(bad)
    (bad / SPARSE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ClpRayError, match="not a readable PyTorch state dict"):
        Embedder.from_pretrained(bad)


def test_hub_ids_download_the_heads_a_repo_without_them_is_dense_and_offline_warns(m3, m3_path, monkeypatch, caplog):
    import huggingface_hub
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from clp_ray.model.m3 import load_heads

    calls = []

    def from_hub(repo, filename, **kw):
        calls.append((repo, filename))
        return str(m3_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_hub)
    heads = load_heads("BAAI/bge-m3", m3.dim)
    assert calls == [("BAAI/bge-m3", SPARSE_FILE), ("BAAI/bge-m3", COLBERT_FILE)]
    assert torch.equal(heads.colbert_linear.weight, m3.heads.colbert_linear.weight)

    def not_in_repo(repo, filename, **kw):
        raise RemoteEntryNotFoundError.__new__(RemoteEntryNotFoundError)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_in_repo)
    with caplog.at_level("WARNING", logger="clp_ray.model.m3"):
        assert load_heads("intfloat/multilingual-e5-small", m3.dim) is None
    assert not caplog.records

    def offline(repo, filename, **kw):
        raise OSError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with caplog.at_level("WARNING", logger="clp_ray.model.m3"):
        assert load_heads("BAAI/bge-m3", m3.dim) is None
    assert "cannot fetch sparse_linear.pt (cannot reach the hub): the model loads without its sparse/ColBERT heads" in caplog.text


# ------------------------------------------------------------------------------ the modes


def test_sparse_and_colbert_equal_a_naive_per_token_reference(m3):
    got = m3.encode(TEXTS, output=("dense", "sparse", "colbert"), kind="passage", batch_size=2)
    assert torch.allclose(got.dense, m3.encode(TEXTS, kind="passage"), atol=1e-6)
    for i, text in enumerate(TEXTS):
        ref = naive_lexical(m3, text)
        assert got.sparse[i].keys() == ref.keys()
        assert all(got.sparse[i][t] == pytest.approx(w, abs=1e-5) for t, w in ref.items())
        assert torch.allclose(got.colbert[i], naive_colbert(m3, text), atol=1e-5)
    # and the scores
    q = m3.encode(TEXTS[:2], output=("sparse", "colbert"), kind="query")
    d = m3.encode(TEXTS[1:], output=("sparse", "colbert"), kind="passage")
    for a in range(2):
        for b in range(len(TEXTS) - 1):
            assert float(naive_lexical_score(q.sparse[a], d.sparse[b])) == pytest.approx(
                _lexical_score(q.sparse[a], d.sparse[b]), abs=1e-5)
            qv, qm = q.colbert[a][None], torch.ones(1, len(q.colbert[a]))
            dv, dm = d.colbert[b][None], torch.ones(1, len(d.colbert[b]))
            assert float(colbert_scores(qv, qm, dv, dm)) == pytest.approx(naive_maxsim(q.colbert[a], d.colbert[b]), abs=1e-5)


def _lexical_score(a: dict, b: dict) -> float:
    vocab = max([*a, *b, 0]) + 1
    va, vb = torch.zeros(1, vocab), torch.zeros(1, vocab)
    for t, w in a.items():
        va[0, t] = w
    for t, w in b.items():
        vb[0, t] = w
    return float(sparse_scores(va, vb))


def test_padding_never_wins_maxsim():
    # Every real dot product is negative: a zero-padded position must not be the max.
    q = torch.tensor([[[1.0, 0.0]]])
    d = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])
    assert float(colbert_scores(q, torch.ones(1, 1), d, torch.tensor([[1, 0]]))) == -1.0


def test_matches_flagembedding(m3, m3_path):
    M3Embedder = flag_embedding()
    ref = M3Embedder(str(m3_path), use_fp16=False, devices="cpu", pooling_method=m3.pooling,
                     query_max_length=m3.query_max_len, passage_max_length=m3.passage_max_len)
    theirs = ref.encode_corpus(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True, batch_size=2)
    ours = m3.encode(TEXTS, kind="passage", output=("dense", "sparse", "colbert"))
    assert np.abs(theirs["dense_vecs"] - ours.dense.numpy()).max() < 1e-5
    for lw, mine, cv, mine_c in zip(theirs["lexical_weights"], ours.sparse, theirs["colbert_vecs"], ours.colbert):
        assert {int(t) for t in lw} == set(mine)
        assert all(abs(float(lw[str(t)]) - w) < 1e-5 for t, w in mine.items())
        assert cv.shape == tuple(mine_c.shape) and np.abs(cv - mine_c.numpy()).max() < 1e-5
    q = ref.encode_queries(TEXTS[:2], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    mine_q = m3.encode(TEXTS[:2], kind="query", output=("sparse", "colbert"))
    for a in range(2):
        for b in range(len(TEXTS)):
            want_lex = ref.compute_lexical_matching_score(q["lexical_weights"][a], theirs["lexical_weights"][b])
            assert _lexical_score(mine_q.sparse[a], ours.sparse[b]) == pytest.approx(float(want_lex), abs=1e-5)
            want_col = float(ref.colbert_score(q["colbert_vecs"][a], theirs["colbert_vecs"][b]))
            qv, dv = mine_q.colbert[a][None], ours.colbert[b][None]
            got = float(colbert_scores(qv, torch.ones(1, qv.shape[1]), dv, torch.ones(1, dv.shape[1])))
            assert got == pytest.approx(want_col, abs=1e-5)


# ------------------------------------------------------------------------------ search


@pytest.fixture(scope="module")
def small_set():
    from clp_ray.evaluation import load_beir

    full = load_beir("pkg://ko_help", "test")
    qids = sorted(full.queries)[:24]
    qrels = {q: full.qrels[q] for q in qids}
    docs = sorted({d for q in qids for d in qrels[q]} | set(sorted(full.corpus)[:60]))
    return type(full)({d: full.corpus[d] for d in docs}, {q: full.queries[q] for q in qids}, qrels, name="small")


def test_hybrid_scores_are_the_weighted_sum_and_search_is_exact(m3, small_set):
    from clp_ray.evaluation.m3_search import ModeReps, exact_mode_search, pair_scores

    vocab = m3.encoder.config.vocab_size
    q = ModeReps.from_encoding(m3.encode(list(small_set.queries.values()), kind="query", output=("dense", "sparse", "colbert")), vocab)
    d = ModeReps.from_encoding(m3.encode(list(small_set.corpus.values()), kind="passage", output=("dense", "sparse", "colbert")), vocab)
    parts = {m: pair_scores(q, d, {m: 1.0}) for m in ("dense", "sparse", "colbert")}
    w = {"dense": 1.0, "sparse": 0.3, "colbert": 0.7}
    hybrid = pair_scores(q, d, w)
    assert torch.allclose(hybrid, sum(w[m] * parts[m] for m in w), atol=1e-5)
    # exact search in small blocks finds the brute-force top 10
    s, i = exact_mode_search(q, d, w, 10, chunk_size=7, query_chunk=5)
    top = hybrid.topk(10, dim=1)
    assert torch.allclose(s, top.values, atol=1e-5)
    assert torch.equal(torch.gather(hybrid, 1, i), s) or torch.allclose(torch.gather(hybrid, 1, i), s, atol=1e-5)


def test_evaluate_modes_and_rerank(m3, small_set):
    from clp_ray.evaluation import evaluate, evaluate_modes, score_run

    modes = ["dense", "sparse", "colbert", "hybrid"]
    exact = evaluate_modes(m3, small_set, modes, top_k=10)
    assert exact["dense"].metrics == evaluate(m3, small_set, top_k=10).metrics
    # the hybrid run is the weighted sum of the single-mode scores (each passage it ranks)
    for qid, ranked in exact["hybrid"].run.items():
        for did, score in list(ranked.items())[:3]:
            q = m3.encode([small_set.queries[qid]], kind="query", output=("dense", "sparse", "colbert"))
            dd = m3.encode([small_set.corpus[did]], kind="passage", output=("dense", "sparse", "colbert"))
            want = (float(q.dense[0] @ dd.dense[0]) + 0.3 * naive_lexical_score(q.sparse[0], dd.sparse[0])
                    + naive_maxsim(q.colbert[0], dd.colbert[0]))
            assert score == pytest.approx(want, abs=1e-4)
    assert score_run(small_set.qrels, exact["sparse"].run)[0] == exact["sparse"].metrics
    # Re-ranking a dense top-N as deep as the corpus is exact search again.
    deep = evaluate_modes(m3, small_set, modes, top_k=10, rerank_depth=len(small_set.corpus))
    for m in modes:
        assert deep[m].metrics == pytest.approx(exact[m].metrics, abs=1e-6)
    shallow = evaluate_modes(m3, small_set, ["colbert"], top_k=10, rerank_depth=10)["colbert"]
    dense_top = {q: set(r) for q, r in exact["dense"].run.items()}
    assert all(set(r) == dense_top[q] for q, r in shallow.run.items())  # only the dense top 10, re-ordered


def test_evaluate_needs_the_heads(tiny_embedder, small_set):
    from clp_ray.evaluation import evaluate

    with pytest.raises(ClpRayError, match="no sparse/colbert head"):
        evaluate(tiny_embedder, small_set, mode="hybrid")
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate(tiny_embedder, small_set, mode="bm25")


# ------------------------------------------------------------------------------ the unified loss


def _batch(seed=0, b=3, g=3, lq=4, lp=6, d=8, vocab=20):
    gen = torch.Generator().manual_seed(seed)

    def side(n, length):
        mask = torch.ones(n, length)
        mask[0, length - 2:] = 0  # a padded row
        vecs = F.normalize(torch.randn(n, length, d, generator=gen), dim=-1) * mask[..., None]
        sparse = torch.relu(torch.randn(n, vocab, generator=gen))
        return ModeOutput(F.normalize(torch.randn(n, d, generator=gen), dim=-1).requires_grad_(),
                          sparse.requires_grad_(), vecs.requires_grad_(), mask)

    return side(b, lq), side(b * g, lp), side(b * (g - 1), lq), b, g


def naive_unified(q, p, nq, b, g, tau, lam, penalty_modes, w, c, distill):
    def maxsim(qv, qm, dv, dm):
        total = 0.0
        for t in range(qv.shape[0]):
            if qm[t]:
                total = total + max(qv[t] @ dv[s] for s in range(dv.shape[0]) if dm[s])
        return total / qm.sum()

    def sim(mode, i, j, qs, ps):
        if mode == "dense":
            return qs.dense[i] @ ps.dense[j]
        if mode == "sparse":
            return qs.sparse[i] @ ps.sparse[j]
        return maxsim(qs.colbert[i], qs.colbert_mask[i], ps.colbert[j], ps.colbert_mask[j])

    scores = {m: torch.stack([torch.stack([sim(m, i, j, q, p) for j in range(b * g)]) for i in range(b)]) / tau
              for m in ("dense", "sparse", "colbert")}

    def ce(s):
        return sum(-torch.log_softmax(s[i], 0)[i * g] for i in range(b)) / b

    def penalty(mode):
        total = 0.0
        for i in range(b):
            for j in range(g - 1):
                neg, own = i * g + 1 + j, i * (g - 1) + j
                if mode == "dense":
                    s = F.cosine_similarity(p.dense[neg], nq.dense[own], dim=0)
                elif mode == "sparse":
                    s = F.cosine_similarity(p.sparse[neg], nq.sparse[own], dim=0)
                else:
                    s = maxsim(nq.colbert[own], nq.colbert_mask[own], p.colbert[neg], p.colbert_mask[neg])
                total = total + (1 - s)
        return total / (b * (g - 1))

    loss_m = {m: ((1 - lam) * ce(scores[m]) + lam * penalty(m)) if m in penalty_modes else ce(scores[m]) for m in scores}
    ens = sum(w[m] * scores[m] for m in scores)
    loss = (loss_m["dense"] + ce(ens) + c * loss_m["sparse"] + loss_m["colbert"]) / 4
    if distill:
        t = torch.softmax(ens.detach(), -1)
        dl = {m: -(t * torch.log_softmax(scores[m], -1)).sum(-1).mean() for m in scores}
        loss = (loss + (dl["dense"] + c * dl["sparse"] + dl["colbert"]) / 3) / 2
    return loss


@pytest.mark.parametrize("penalty_modes,distill", [(("dense",), True), (("dense", "sparse", "colbert"), True),
                                                   (("dense",), False)])
def test_unified_loss_equals_a_naive_reference(penalty_modes, distill):
    from clp_ray.loss.m3 import unified_loss
    from clp_ray.loss.settings import LossSettings

    q, p, nq, b, g = _batch()
    w = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}
    s = LossSettings(temperature=0.05, lam=0.2, cross_device=False, penalty_modes=penalty_modes, weights=w,
                       sparse_loss_weight=0.1, self_distill=distill)
    out = unified_loss(q, p, nq, s)
    want = naive_unified(q, p, nq, b, g, 0.05, 0.2, penalty_modes, w, 0.1, distill)
    assert float(out.loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    grads = torch.autograd.grad(out.loss, [p.sparse, p.colbert, q.dense])
    want_grads = torch.autograd.grad(want, [p.sparse, p.colbert, q.dense])
    for a, e in zip(grads, want_grads):
        assert torch.allclose(a, e, atol=1e-5)
    assert ("distill" in out.components) == distill
    assert ("colbert_penalty" in out.components) == ("colbert" in penalty_modes)


def test_objective_unified_trains_the_heads_and_grad_cache_agrees(m3):
    from clp_ray.data import Collator, Group
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings

    groups = [Group(f"질문 {i} 셀", [f"정답 {i} 셀 보호", f"오답 {i} 차트"], [f"다른 {i}"]) for i in range(5)]
    batch = Collator.for_embedder(m3, 2)(groups)
    settings = LossSettings(temperature=0.05, lam=0.1, cross_device=False, unified=True)
    m3.train()
    results = []
    for chunk in (None, 2):
        torch.manual_seed(0)
        obj = CLPObjective(m3, settings, chunk_size=chunk)
        out = obj(batch["query"], batch["passage"], batch["neg_query"])
        m3.zero_grad()
        out.loss.backward()
        results.append((float(out.loss), {n: p.grad.clone() for n, p in m3.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert g0.keys() == g1.keys() and "heads.sparse_linear.weight" in g0 and "heads.colbert_linear.weight" in g0
    assert float(g0["heads.sparse_linear.weight"].abs().sum()) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n
    assert {"dense", "sparse", "colbert", "ensemble", "distill"} <= set(out.components)


# ------------------------------------------------------------------------------ registry and serving


def test_heads_survive_register_and_pyfunc_bit_identically(m3, m3_path, tiny_path, tmp_path):
    import mlflow
    from conftest import register_model

    from clp_ray.tracking.pyfunc import BadInput

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_model(uri, m3_path)
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts("models:/clp-ray-hi@champion")
    for f in (SPARSE_FILE, COLBERT_FILE):
        (found,) = list(Path(local).rglob(f))
        assert found.read_bytes() == (m3_path / f).read_bytes()
    model = mlflow.pyfunc.load_model("models:/clp-ray-hi@champion")
    sparse = model.predict(TEXTS, params={"output": "sparse", "kind": "passage"})
    assert sparse == [{str(t): w for t, w in row.items()} for row in m3.encode(TEXTS, kind="passage", output="sparse")]
    colbert = model.predict(TEXTS, params={"output": "colbert"})
    for got, want in zip(colbert, m3.encode(TEXTS, kind="query", output="colbert")):
        assert got.dtype == np.float32 and np.array_equal(got, want.numpy())
    assert np.array_equal(model.predict(TEXTS), m3.encode(TEXTS, kind="query").numpy())

    register_model(uri, tiny_path, name="clp-ray-ko")
    dense_only = mlflow.pyfunc.load_model("models:/clp-ray-ko@champion")
    with pytest.raises(BadInput, match="no sparse head"):
        dense_only.predict(["a"], params={"output": "sparse"})


def test_serve_encodes_each_output_and_the_request_names_it(m3):
    from clp_ray.serving.app import EmbedJob, _encode
    from clp_ray.serving.openai_api import ApiError, RequestLimits, parse_request

    jobs = [EmbedJob("m/1", "query", TEXTS[:2], "sparse"), EmbedJob("m/1", "query", TEXTS[2:], "sparse")]
    got = [e for r in _encode(m3, jobs, "query", 8, "sparse") for e in r.embeddings()]
    assert got == [{str(t): w for t, w in row.items()} for row in m3.encode(TEXTS, kind="query", output="sparse")]
    (res,) = _encode(m3, [EmbedJob("m/1", "passage", TEXTS, "colbert")], "passage", 8, "colbert")
    for got_v, want in zip(res.embeddings(), m3.encode(TEXTS, kind="passage", output="colbert")):
        assert np.allclose(np.asarray(got_v), want.numpy(), atol=0)
    assert parse_request(b'{"model": "m", "input": "a", "output": "colbert"}', RequestLimits(8)).output == "colbert"
    with pytest.raises(ApiError, match="output"):
        parse_request(b'{"model": "m", "input": "a", "output": "bm25"}', RequestLimits(8))


def test_length_buckets_and_chunks_give_the_same_mode_outputs(m3):
    from clp_ray.data import Collator, Group
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings

    groups = [Group(f"질문 {i}", [TEXTS[i % len(TEXTS)], TEXTS[(i + 2) % len(TEXTS)]], ["다른"]) for i in range(4)]
    settings = LossSettings(temperature=0.05, lam=0.0, cross_device=False, unified=True)
    m3.eval()
    outs = []
    for bucket, chunk in ((0, None), (3, None), (0, 3)):
        batch = Collator.for_embedder(m3, bucket)(groups)["passage"]
        with torch.no_grad():
            outs.append(CLPObjective(m3, settings, chunk_size=chunk).encode(batch).out)
    ref = outs[0]
    for other in outs[1:]:
        assert torch.allclose(other.dense, ref.dense, atol=1e-5) and torch.allclose(other.sparse, ref.sparse, atol=1e-5)
        for i in range(ref.dense.shape[0]):
            a = ref.colbert[i][ref.colbert_mask[i].bool()]
            b = other.colbert[i][other.colbert_mask[i].bool()]
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
