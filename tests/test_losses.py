import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clp_ray.loss.clp import clp_loss


def naive_clp(q, p, neg_q, temperature, lam):
    """Per-example loop straight from the definition."""
    b, g = q.shape[0], p.shape[0] // q.shape[0]
    ce = []
    for i in range(b):
        scores = torch.stack([q[i] @ p[j] for j in range(b * g)]) / temperature
        ce.append(-torch.log_softmax(scores, 0)[i * g])
    contrastive = torch.stack(ce).mean()
    if lam == 0 or neg_q is None or g == 1:
        return contrastive, contrastive
    pen = []
    for i in range(b):
        for j in range(1, g):
            neg = p[i * g + j]
            own_query = neg_q[i * (g - 1) + (j - 1)]
            pen.append(1 - (neg @ own_query) / (neg.norm() * own_query.norm()))
    penalty = torch.stack(pen).mean()
    return (1 - lam) * contrastive + lam * penalty, contrastive


def batch(b, g, d=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=gen, dtype=dtype), dim=-1)
    p = F.normalize(torch.randn(b * g, d, generator=gen, dtype=dtype), dim=-1)
    nq = F.normalize(torch.randn(b * (g - 1), d, generator=gen, dtype=dtype), dim=-1)
    return q, p, nq


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("g", [2, 5])
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_matches_naive_reference(b, g, lam):
    q, p, nq = batch(b, g, seed=b * 10 + g)
    out = clp_loss(q, p, nq, temperature=0.05, lam=lam)
    ref, ref_ce = naive_clp(q, p, nq, 0.05, lam)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.contrastive, ref_ce, rtol=1e-12, atol=1e-12)


def test_penalty_pairs_each_negative_with_its_own_query():
    # Make every negative identical to its own query: penalty must be exactly 0 for B > 1.
    q, p, _ = batch(3, 4)
    nq = p.view(3, 4, -1)[:, 1:].reshape(-1, p.shape[1]).clone()
    assert clp_loss(q, p, nq, temperature=0.05, lam=0.5).penalty.item() == pytest.approx(0.0, abs=1e-12)
    # Shuffling the neg_q rows breaks the pairing and the penalty becomes positive.
    assert clp_loss(q, p, nq.flip(0), temperature=0.05, lam=0.5).penalty.item() > 0.1


def test_lambda_zero_and_no_neg_q_are_exact_infonce():
    q, p, nq = batch(4, 3)
    scores = q @ p.T / 0.02
    infonce = F.cross_entropy(scores, torch.arange(4) * 3)
    assert torch.equal(clp_loss(q, p, nq, temperature=0.02, lam=0.0).loss, infonce)
    assert torch.equal(clp_loss(q, p, None, temperature=0.02, lam=0.0).loss, infonce)


def test_gradcheck():
    q, p, nq = (t.requires_grad_() for t in batch(2, 3, d=5))
    assert torch.autograd.gradcheck(lambda a, b, c: clp_loss(a, b, c, temperature=0.1, lam=0.3).loss, (q, p, nq))


def test_bad_shapes_and_missing_neg_q():
    q, p, nq = batch(2, 3)
    with pytest.raises(ValueError, match="needs neg_q"):
        clp_loss(q, p, None, temperature=0.05, lam=0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        clp_loss(q, p[:5], nq, temperature=0.05, lam=0.1)
    with pytest.raises(ValueError, match=r"neg_q must be \[B\*\(G-1\), D\]"):
        clp_loss(q, p, nq[:3], temperature=0.05, lam=0.1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, shards, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    q, p, nq = (t.clone().requires_grad_() for t in shards[rank])
    out = clp_loss(q, p, nq, temperature=0.05, lam=0.3)
    out.loss.backward()
    results[rank] = (out.loss.detach(), q.grad, p.grad, nq.grad)
    dist.destroy_process_group()


def test_cross_device_equals_single_process_on_concatenated_batch():
    b, g, world = 2, 3, 2
    shards = [batch(b, g, seed=s) for s in range(world)]
    full = [torch.cat([s[i] for s in shards]).requires_grad_() for i in range(3)]
    ref = clp_loss(*full, temperature=0.05, lam=0.3, cross_device=False)
    ref.loss.backward()

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), shards, results), nprocs=world, join=True)
    for rank in range(world):
        loss, gq, gp, gnq = results[rank]
        torch.testing.assert_close(loss, ref.loss.detach(), rtol=1e-12, atol=1e-12)
        # Data-parallel training averages gradients over ranks; the gather's summed backward
        # makes that average equal the gradient of the loss on the concatenated batch.
        for local, full_t, n in ((gq, full[0], b), (gp, full[1], b * g), (gnq, full[2], b * (g - 1))):
            torch.testing.assert_close(local / world, full_t.grad[rank * n : (rank + 1) * n], rtol=1e-10, atol=1e-12)


def test_loss_settings_come_from_the_config_once_with_the_schemas_defaults():
    from clp_ray.config import LossConfig, load_config
    from clp_ray.loss.settings import LossSettings, needs_hard_negatives

    d = LossConfig()
    assert (LossSettings().temperature, LossSettings().lam) == (d.temperature, d.lam) == (0.02, 0.1)
    cfg = load_config("ko", "tiny", ["loss.temperature=0.07", "loss.lam=0.0", "loss.cross_device_negatives=false",
                                     "model.m3_heads=unified", "loss.m3.penalty_modes=[dense, colbert]",
                                     "loss.m3.sparse_loss_weight=0.2", "loss.m3.self_distill=false"])
    s = LossSettings.from_config(cfg)
    assert (s.temperature, s.lam, s.cross_device, s.unified) == (0.07, 0.0, False, True)
    assert (s.penalty_modes, s.sparse_loss_weight, s.self_distill) == (("dense", "colbert"), 0.2, False)
    assert s.weights == cfg.loss.m3.ensemble_weights.model_dump() and not s.require_neg_q
    assert LossSettings(lam=0.1).require_neg_q and not LossSettings.from_config(load_config("ko", "tiny")).unified
    assert needs_hard_negatives(0.1, 1) and not needs_hard_negatives(0.0, 1) and not needs_hard_negatives(0.1, 2)
