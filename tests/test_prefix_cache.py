"""The frozen-prefix cache (clp_ray/model/prefix_cache.py): exact losses, gradients and metrics,
one prefix forward per sequence, shared through its directory."""

import pytest
import torch
from test_grad_cache import assert_same, batch

from clp_ray.loss.objective import CLPObjective
from clp_ray.loss.settings import LossSettings
from clp_ray.model import prefix_cache
from clp_ray.model.embedder import Embedder
from clp_ray.model.moe import apply_train_only


def paper_model(tiny_path, policy="moe"):
    """The paper's setting on the tiny encoder: the last layer upcycled, only its experts train."""
    emb = Embedder.from_pretrained(tiny_path)
    torch.manual_seed(0)  # the new routers start alike in every copy
    emb.upcycle([-1], num_experts=2, top_k=1)
    apply_train_only(emb, policy, layers=[-1])
    return emb


def eval_mode_prefix(emb):
    """The uncached reference the cache must equal: the prefix in eval mode (no dropout), the top training."""
    emb.train()
    k = prefix_cache.split_layer(emb.encoder)
    emb.encoder.embeddings.eval()
    for layer in emb.encoder.encoder.layer[:k]:
        layer.eval()
    return emb


def loss_and_grads(emb, inputs, seed=0, **kw):
    obj = CLPObjective(emb, LossSettings(temperature=0.05, lam=0.1, cross_device=False), **kw)
    emb.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = obj(*inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}


def test_split_layer_follows_what_trains(tiny_path):
    emb = paper_model(tiny_path)
    n = len(emb.encoder.encoder.layer)
    assert prefix_cache.split_layer(emb.encoder) == n - 1
    apply_train_only(emb, "all")
    assert prefix_cache.split_layer(emb.encoder) is None  # the embeddings train: nothing to cache
    apply_train_only(emb, "ffn")
    assert prefix_cache.split_layer(emb.encoder) is None  # layer 0 trains
    for p in emb.parameters():
        p.requires_grad_(False)
    assert prefix_cache.split_layer(emb.encoder) == n  # nothing trains: the whole stack is the prefix


@pytest.mark.parametrize("chunk", [None, 3])
def test_cached_loss_and_gradients_equal_the_eval_mode_prefix_paths(tiny_path, chunk):
    """With dropout on in the trainable top (training mode), seeded alike: the same loss and
    gradients to 1e-5, uncached against cached on the first (miss) and second (hit) pass."""
    ref_emb = eval_mode_prefix(paper_model(tiny_path))
    inputs = batch(ref_emb)
    ref_out, ref = loss_and_grads(ref_emb, inputs, chunk_size=chunk)
    emb = paper_model(tiny_path).train()
    cache = prefix_cache.attach(emb, None)
    computed = []
    for _ in range(2):  # the first pass computes the prefix (misses), the second reads it back
        out, got = loss_and_grads(emb, inputs, chunk_size=chunk)
        assert_same(got, ref)
        torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=1e-5)
        computed.append(cache.stats.computed)
    assert computed[0] > 0 and computed[1] == computed[0]  # the second pass ran no prefix at all
    assert any(".experts." in n for n in got) and not any("embeddings" in n for n in got)


def small_set(n_docs=60, n_queries=20):
    from clp_ray.config import resolve_path
    from clp_ray.evaluation import RetrievalSet, load_beir

    full = load_beir(resolve_path("pkg://ko_help"), split="dev")
    qids = list(full.queries)[:n_queries]
    docs = {d for q in qids for d in full.qrels[q]}
    docs |= set(list(full.corpus)[:n_docs])
    return RetrievalSet({d: full.corpus[d] for d in docs}, {q: full.queries[q] for q in qids},
                        {q: full.qrels[q] for q in qids}, name="small")


def test_dev_metrics_and_embeddings_are_the_uncached_ones(tiny_path):
    from clp_ray.evaluation import evaluate

    data = small_set()
    emb = paper_model(tiny_path)
    ref = evaluate(emb, data, batch_size=16).metrics
    texts = list(data.corpus.values())[:10]
    ref_vec = emb.encode([t if isinstance(t, str) else t.get("text", "") for t in texts], kind="passage")
    cache = prefix_cache.attach(emb, None)
    for _ in range(2):
        assert evaluate(emb, data, batch_size=16).metrics == pytest.approx(ref, abs=1e-9)
    once = cache.stats.computed
    assert once == len(data.corpus) + len(data.queries) and cache.stats.hits == once  # the second pass: all hits
    got = emb.encode([t if isinstance(t, str) else t.get("text", "") for t in texts], kind="passage")
    torch.testing.assert_close(got, ref_vec, rtol=0, atol=1e-6)


def test_epochs_and_processes_share_one_prefix_forward_per_sequence(tiny_path, tmp_path):
    """Three epochs over the same batches: each distinct sequence runs through the prefix once; a
    second process (a later trial) on the same folder runs none; other prefix weights, another namespace."""
    emb = paper_model(tiny_path).train()
    inputs = batch(emb)
    distinct = {tuple(r[m.bool()].tolist()) for b in inputs for r, m in zip(b["input_ids"], b["attention_mask"])}
    first = prefix_cache.attach(emb, tmp_path)
    for _ in range(3):
        loss_and_grads(emb, inputs)
    assert first.stats.computed == len(distinct) and first.stats.hits == 2 * sum(len(b["input_ids"]) for b in inputs) \
        + sum(len(b["input_ids"]) for b in inputs) - len(distinct)
    assert first.flush() == len(distinct)
    emb.encode(["one more text"], kind="query")  # encode writes what it computed at once (no flush needed)
    assert first.flush() == 0 and len(first) == len(distinct) + 1
    again = paper_model(tiny_path).train()
    second = prefix_cache.attach(again, tmp_path)
    assert second.namespace == first.namespace and len(second) == len(distinct) + 1
    out, got = loss_and_grads(again, inputs)
    assert second.stats.computed == 0
    assert_same(got, loss_and_grads(emb, inputs)[1])
    other = paper_model(tiny_path)
    with torch.no_grad():
        other.encoder.embeddings.word_embeddings.weight.add_(0.01)
    assert prefix_cache.attach(other, tmp_path).namespace != first.namespace
    assert {p.name for p in tmp_path.iterdir()} == {first.namespace, prefix_cache.attach(other, tmp_path).namespace}


def test_left_padding_runs_uncached_and_a_training_prefix_is_refused(tiny_path):
    emb = paper_model(tiny_path)
    cache = prefix_cache.attach(emb, None)
    ids = torch.tensor([[0, 0, 5, 6, 2], [0, 7, 8, 9, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert cache.last_hidden_state(ids, mask) is None
    emb.encoder.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(Exception, match="trains now"):
        cache.last_hidden_state(ids, torch.ones_like(ids))


def test_config_derived_layer_and_folder(tmp_path):
    from clp_ray.config import load_config

    cfg = load_config("ko", "tiny", [f"train.output_dir={tmp_path}", "moe.train_only=moe"])
    assert prefix_cache.trained_from(cfg, 4) == 3
    assert prefix_cache.prefix_cache_dir(cfg) == str(tmp_path.resolve() / "prefix_cache")
    assert prefix_cache.trained_from(load_config("ko", "tiny", ["moe.enabled=false", "moe.train_only=moe"]), 4) is None  # trains everything
    assert prefix_cache.trained_from(load_config("ko", "tiny", ["moe.layers=[0]", "moe.train_only=moe"]), 4) is None
    assert prefix_cache.prefix_cache_dir(load_config("ko", "tiny", ["train.prefix_cache=false"])) is None
    with pytest.raises(Exception, match="local folder"):
        prefix_cache.prefix_cache_dir(load_config("ko", "tiny", ["train.prefix_cache_dir=s3://b/x"]))


def test_prefill_computes_every_text_training_meets(tiny_path, tmp_path, small_data):
    """The driver's fill (in-process) covers exactly what the epochs encode: afterwards a pass over
    every epoch's batches computes no prefix at all."""
    from clp_ray.config import load_config
    from clp_ray.data import Collator, load_records, sample_group, validate
    from clp_ray.model.source import load_embedder
    from clp_ray.train import prefix_fill

    cfg = load_config("ko", "tiny", [f"data.train_paths=[{small_data}]", "data.train_group_size=2", "train.epochs=2",
                                     "moe.train_only=moe", f"train.output_dir={tmp_path}", "loss.lam=0.1"])
    records = load_records(validate(cfg.data.train_paths, require_neg_q=True, group_size=2), require_neg_q=True,
                           group_size=2, max_line_bytes=cfg.data.max_line_bytes)
    texts = prefix_fill.training_texts(cfg, records)
    base = load_embedder(cfg.model)
    k = prefix_cache.trained_from(cfg, len(base.encoder.encoder.layer))
    computed = prefix_fill.fill(prefix_cache.FrozenPrefix(base.encoder, k, tmp_path), base, texts)
    distinct = {tuple(base.tokenize([t], kind=kind)["input_ids"][0].tolist()) for kind, v in texts.items() for t in v}
    assert computed == len(distinct) > 0
    assert prefix_fill.fill(prefix_cache.FrozenPrefix(base.encoder, k, tmp_path), base, texts) == 0  # all cached
    torch.manual_seed(0)
    emb = load_embedder(cfg.model, cfg.moe)
    apply_train_only(emb, "moe")
    cache = prefix_cache.attach(emb, tmp_path)
    assert cache.namespace == prefix_cache.FrozenPrefix(base.encoder, k).namespace  # upcycling leaves the prefix alone
    collate = Collator.for_embedder(emb)
    obj = CLPObjective(emb, LossSettings.from_config(cfg))
    for epoch in range(2):
        groups = [sample_group(records[j], 2, seed=cfg.data.seed, epoch=epoch, index=j) for j in range(len(records))]
        for start in range(0, len(groups), 8):
            b = collate(groups[start:start + 8])
            obj(b["query"], b["passage"], b["neg_query"]).loss.backward()
    assert cache.stats.computed == 0 and cache.stats.hits > 0


def test_an_unwritable_folder_keeps_the_cache_in_memory(tiny_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    emb = paper_model(tiny_path)
    cache = prefix_cache.attach(emb, blocker)  # <file>/<namespace> cannot be made
    assert cache.dir is None
    emb.encode(["a text", "another text"], kind="passage")
    assert cache.stats.computed == 2 and cache.flush() == 0 and len(cache) == 2


def test_weights_in_another_dtype_get_another_namespace(tiny_path):
    """DeepSpeed's bf16 casts the weights: states computed with them never serve fp32 weights."""
    a, b = paper_model(tiny_path), paper_model(tiny_path).to(torch.bfloat16)
    k = prefix_cache.split_layer(a.encoder)
    assert prefix_cache.prefix_hash(a.encoder, k) != prefix_cache.prefix_hash(b.encoder, k)
    assert prefix_cache.prefix_hash(a.encoder, k) == prefix_cache.prefix_hash(paper_model(tiny_path).encoder, k)
    assert prefix_cache.prefix_hash(a.encoder, k) != prefix_cache.prefix_hash(a.encoder, k - 1)
