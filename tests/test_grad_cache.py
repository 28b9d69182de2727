"""Gradient caching (train.grad_cache): the chunked, checkpointed CLP objective gives the uncached
objective's gradients."""

import json

import pytest
import torch

from clp_ray.config import resolve_path
from clp_ray.loss.objective import CLPObjective
from clp_ray.loss.settings import LossSettings
from clp_ray.model.embedder import Embedder
from clp_ray.model.moe import moe_layers

B, G = 8, 4


def texts(n, offset=0):
    with open(resolve_path("pkg://ko_help/train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][offset:offset + n]
    return [r["query"] for r in rows], [t for r in rows for t in (r["pos"] + r["neg"])]


def batch(emb):
    qs, ps = texts(B * G)
    return (emb.tokenize(qs[:B], kind="query"), emb.tokenize(ps[:B * G], kind="passage"),
            emb.tokenize(qs[B:B + B * (G - 1)], kind="query"))


def model(tiny_path, top_k):
    emb = Embedder.from_pretrained(tiny_path)
    if top_k:
        emb.upcycle([0, 1], num_experts=3, top_k=top_k, jitter=0.1)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, m in moe_layers(emb.encoder):
                m.router.weight.normal_(generator=gen)
                for ex in m.experts:
                    ex.weight.add_(torch.randn(ex.weight.shape, generator=gen) * 0.05)
    return emb


def grads(emb, inputs, seed, **kw):
    obj = CLPObjective(emb, LossSettings(temperature=0.05, lam=kw.pop("lam"), cross_device=False), **kw)
    emb.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = obj(*inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("lam", [0.0, 0.1])
@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("chunk", [3, 4])  # 3 divides none of 8, 32, 24; 4 divides them all
def test_cached_gradients_equal_the_uncached_objectives(tiny_path, lam, top_k, chunk):
    emb = model(tiny_path, top_k).eval()  # no dropout: one whole-batch pass is the reference
    inputs = batch(emb)
    ref_out, ref = grads(emb, inputs, 0, lam=lam)
    out, got = grads(emb, inputs, 0, lam=lam, chunk_size=chunk)
    assert_same(got, ref)
    # fp32: the chunks are padded to their own widths, so sums run in another order (a few ulps of ~4)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.router_loss, ref_out.router_loss, rtol=0, atol=1e-7)
    if top_k:
        assert out.router_loss > 0 and any("router" in n for n in got)


@pytest.mark.parametrize("top_k", [1, 2])
def test_with_dropout_and_jitter_the_replay_is_exact(tiny_path, top_k):
    """Dropout masks of a whole-batch pass cannot be drawn chunk by chunk (the generator's draw order
    differs), so with dropout on the reference is the same chunks with their graphs kept: the
    checkpointed re-forward must replay the first pass's random state exactly."""
    emb = model(tiny_path, top_k).train()
    inputs = batch(emb)
    _, ref = grads(emb, inputs, 7, lam=0.1, chunk_size=3, checkpoint=False)
    _, got = grads(emb, inputs, 7, lam=0.1, chunk_size=3)
    assert_same(got, ref)
    _, other_seed = grads(emb, inputs, 8, lam=0.1, chunk_size=3)
    assert max((other_seed[n] - ref[n]).abs().max() for n in ref) > 1e-4  # dropout is really on


def _rank(rank, world, port, tiny_path, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    emb = model(tiny_path, 1).eval()
    q, p, nq = batch(emb)
    shard = {"q": B // world, "p": B * G // world, "nq": B * (G - 1) // world}  # this rank's rows
    inputs = [{k: v[rank * n:(rank + 1) * n] for k, v in t.items()} for t, n in zip((q, p, nq), shard.values())]

    def rank_grads(**kw):
        obj = CLPObjective(emb, LossSettings(temperature=0.05, lam=0.1, cross_device=True), **kw)
        emb.zero_grad(set_to_none=True)
        out = obj(*inputs)
        out.loss.backward()
        return {n: t.grad.clone() for n, t in emb.named_parameters() if t.grad is not None}

    ref, got = rank_grads(), rank_grads(chunk_size=3)
    results[rank] = max(float((got[n] - ref[n]).abs().max()) for n in ref), sorted(ref) == sorted(got)
    dist.destroy_process_group()


def test_across_two_gloo_processes_with_cross_device_negatives(tiny_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, tiny_path, results), nprocs=2, join=True)
    for rank in range(2):
        diff, same_params = results[rank]
        assert same_params and diff <= 1e-5, (rank, diff)
