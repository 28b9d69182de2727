"""grouped_linear: forward and every gradient against autograd through plain per-slot Linears."""

import pytest
import torch

from clp_ray.model.grouped_linear import _column_blocks, grouped_linear


@pytest.fixture
def intra_op_threads(request):
    """Run with torch.get_num_threads() == request.param: on CPU the forward splits each expert's
    product into a multiple of that many column blocks when they divide the output width."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def reference(x, slot_token, counts, gates, weights, biases):
    out = torch.zeros(x.shape[0], weights[0].shape[0], dtype=x.dtype)
    e_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for j in range(slot_token.shape[0]):
        e, t = int(e_of[j]), int(slot_token[j])
        y = x[t] @ weights[e].T + (biases[e] if biases else 0)
        out = out.index_add(0, slot_token[j : j + 1], (gates[j] * y).unsqueeze(0))
    return out


def routed(n, k, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    if k == 1:  # the last expert gets no rows
        top_i = torch.randint(0, num_experts - 1, (n, 1), generator=g)
    else:
        top_i = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(n)])
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order // k, counts


@pytest.mark.parametrize("intra_op_threads", [1, 2, 4], indirect=True)
@pytest.mark.parametrize("k,bias,d_out", [(1, True, 4), (2, True, 4), (3, False, 4), (1, True, 5)])
def test_forward_and_gradients_equal_per_slot_reference(k, bias, d_out, intra_op_threads):
    blocks = _column_blocks(torch.empty(0), d_out, rows=7)
    assert blocks == (intra_op_threads if d_out % intra_op_threads == 0 else 1)
    torch.manual_seed(k)
    n, d_in, num_experts = 7, 5, 4
    slot_token, counts = routed(n, k, num_experts, seed=k)
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(n * k, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True) for _ in range(num_experts)]
    biases = [torch.randn(d_out, dtype=torch.float64, requires_grad=True) for _ in range(num_experts)] if bias else None
    params = [x, gates, *weights, *(biases or [])]
    upstream = torch.randn(n, d_out, dtype=torch.float64)

    out = grouped_linear(x, slot_token, counts, gates, weights, biases)
    ref = reference(x, slot_token, counts, gates, weights, biases)
    torch.testing.assert_close(out, ref)
    ref_grads = torch.autograd.grad(ref, params, upstream, materialize_grads=True)
    for a, b in zip(torch.autograd.grad(out, params, upstream), ref_grads):
        torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda *p: grouped_linear(p[0], slot_token, counts, p[1], p[2:6], p[6:] or None),
                             tuple(params))


@pytest.mark.parametrize("intra_op_threads", [1, 2, 3], indirect=True)
def test_column_blocks_are_whole_per_thread_and_widen_with_the_rows(intra_op_threads):
    t, cpu = intra_op_threads, torch.empty(0)
    blocks = {(n_out, rows): _column_blocks(cpu, n_out, rows) for n_out in (4, 5, 1024, 4096, 4099) for rows in (256, 512, 1024)}
    for (n_out, rows), b in blocks.items():
        assert n_out % b == 0 and (b == 1 or b % t == 0), (n_out, rows, b)
        assert b == 1 or n_out // b >= min(128, n_out // t)  # never narrower than 128 columns
    if t == 2:  # the fewest blocks at most max(512, 2 * rows) wide
        assert [blocks[4096, r] for r in (256, 512, 1024)] == [8, 4, 2]
        assert [blocks[1024, r] for r in (256, 512, 1024)] == [2, 2, 2]
    if t == 3:  # 3 divides none of 4096's widths: one product per expert
        assert blocks[4096, 256] == 1
    assert blocks[4, 256] == (1 if t > 1 and 4 % t else t) and blocks[5, 256] == 1 and blocks[4099, 256] == 1
    assert _column_blocks(torch.empty(0, device="meta"), 4096, 256) == 1  # not CPU: one product per expert


@pytest.mark.parametrize("intra_op_threads", [2], indirect=True)
@pytest.mark.parametrize("k", [1, 2])
def test_experts_split_into_different_block_counts_equal_the_masked_reference(k, intra_op_threads):
    # 2048 outputs: an expert with 600 or more rows runs as 2 blocks (1024 wide), those with fewer as 4.
    torch.manual_seed(0)
    n, d_in, d_out, num_experts = 700, 6, 2048, 3
    top_i = torch.cat([torch.zeros(600, dtype=torch.long), torch.ones(80, dtype=torch.long), torch.full((20,), 2)])
    top_i = torch.stack([top_i, (top_i + 1) % num_experts], 1)[:, :k][torch.randperm(n)]
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    assert [_column_blocks(torch.empty(0), d_out, c) for c in counts] == ([2, 4, 4] if k == 1 else [2, 2, 4])
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    p = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(d_out, d_in, dtype=torch.float64, requires_grad=True) for _ in range(num_experts)]
    biases = [torch.randn(d_out, dtype=torch.float64, requires_grad=True) for _ in range(num_experts)]
    upstream = torch.randn(n, d_out, dtype=torch.float64)
    out = grouped_linear(x, order // k, counts, p.reshape(-1)[order], weights, biases)
    ref = sum(((top_i == e) * p).sum(1, keepdim=True) * (x @ w.T + b) for e, (w, b) in enumerate(zip(weights, biases)))
    torch.testing.assert_close(out, ref)
    params = [x, p, *weights, *biases]
    for a, b in zip(torch.autograd.grad(out, params, upstream), torch.autograd.grad(ref, params, upstream)):
        torch.testing.assert_close(a, b)


def test_unit_gates_skip_the_multiply_but_not_the_gradient():
    # Straight-through top-1: gates p / stopgrad(p) are exactly 1; dL/dp = <grad, y> / p.
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    slot_token, counts = routed(6, 1, 3, seed=0)
    weights = [torch.randn(2, 3, dtype=torch.float64) for _ in range(3)]
    biases = [torch.randn(2, dtype=torch.float64) for _ in range(3)]
    p = torch.rand(6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 2, dtype=torch.float64)
    fast = grouped_linear(x, slot_token, counts, p / p.detach(), weights, biases, unit_gates=True)
    ref = reference(x, slot_token, counts, p / p.detach(), weights, biases)
    torch.testing.assert_close(fast, ref)
    (g_fast,) = torch.autograd.grad(fast, p, upstream)
    (g_ref,) = torch.autograd.grad(ref, p, upstream)
    torch.testing.assert_close(g_fast, g_ref)
    assert g_fast.abs().min() > 0


def test_expert_without_rows_gets_zero_gradients_and_frozen_ones_none():
    x = torch.randn(4, 3, requires_grad=True)
    weights = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True),
               torch.randn(2, 3, requires_grad=False)]
    biases = [torch.zeros(2, requires_grad=True) for _ in range(3)]
    out = grouped_linear(x, torch.arange(4), [4, 0, 0], torch.ones(4), weights, biases)
    out.sum().backward()
    assert torch.equal(weights[1].grad, torch.zeros(2, 3)) and torch.equal(biases[1].grad, torch.zeros(2))
    assert weights[2].grad is None
    assert x.grad is not None


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="counts sum to 3 but there are 4 slots"):
        grouped_linear(torch.randn(4, 3), torch.arange(4), [1, 2], torch.ones(4), [torch.randn(2, 3)] * 2)


def test_mixed_biases_are_rejected():
    weights = [torch.randn(2, 3)] * 2
    with pytest.raises(ValueError, match="1 of 2 experts have no bias"):
        grouped_linear(torch.randn(4, 3), torch.arange(4), [2, 2], torch.ones(4), weights, [torch.zeros(2), None])
    out = grouped_linear(torch.randn(4, 3), torch.arange(4), [2, 2], torch.ones(4), weights, [None, None])
    assert out.shape == (4, 2)
