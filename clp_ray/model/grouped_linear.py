"""Grouped expert Linear: E ``nn.Linear`` experts applied to their own tokens in one autograd node.

``grouped_linear(x, slot_token, counts, gates, weights, biases)`` computes, for every routed
(token, slot) pair ``j`` sorted by expert (``counts[e]`` consecutive slots per expert),
``out[slot_token[j]] += gate_j * (W_e x_{slot_token[j]} + b_e)``, and its gradients with respect to
``x``, the gates and every expert's weight and bias.

Why one hand-written node instead of calling each expert ``nn.Linear`` on a slice:

- No ``[tokens, out]`` concatenation, gate multiply or gather pass of its own: the experts' rows
  go to token order in one scatter (on CPU with several threads, one per expert while it is still
  in cache). For the straight-through top-1 gate (value exactly 1) the multiply is skipped.
- The gate gradient ``<grad_t, y_j>`` is computed as ``<grad_t W_e, x_j> + <grad_t, b_e>``: the first
  factor is the input gradient the backward computes anyway, so the ``[tokens, out]`` expert output
  never has to be kept for the backward.
- Few calls per expert: on a GPU each call is a kernel launch, and launches, not arithmetic, are
  most of an MoE layer's cost there. The per-expert loops hold only the expert products; the
  gathers, scatters, gate multiplies and dot products each run once over all slots.
- On CPU the forward product of each expert runs as a batch of column blocks, a whole number
  per thread, sized to the expert's rows (:func:`_column_blocks`).

Every expert gets a gradient, zero when it received no tokens, so data-parallel gradient buckets
have the same layout on every rank. Under DeepSpeed ZeRO-3 the experts' parameters are read here
without calling the expert modules, so they must be registered as external parameters of the MoE
layer (``deepspeed.zero.register_external_parameter``, done by the training loop): ZeRO-3 then
gathers them whenever that layer runs, forward and backward. (Marking the MoE layer a ZeRO-3 leaf
module instead breaks when its input needs no gradient, e.g. with ``train_only: moe``: the leaf's
gradient hook then fires before this backward has run.)
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Optional

import torch


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slot_token, gates, counts, unit_gates, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        n_tokens, n_slots = x.shape[0], slot_token.shape[0]
        k = n_slots // n_tokens if n_tokens else 1
        xs = x.index_select(0, slot_token)  # inputs in expert order
        bounds = list(accumulate(counts, initial=0))
        blocks = [_column_blocks(x, weights[0].shape[0], hi - lo) for lo, hi in zip(bounds, bounds[1:])]
        if max(blocks) > 1:
            out = _forward_blocks(x, xs, slot_token, gates, bounds, unit_gates, k, blocks, weights, biases)
        else:
            out = _forward_rows(x, xs, slot_token, gates, bounds, unit_gates, k, weights, biases)
        ctx.save_for_backward(xs, slot_token, gates)
        # Parameters are held by reference, not saved: ZeRO-3 swaps their storage between the
        # forward and the backward (and gathers them again before this backward runs).
        ctx.params, ctx.n_weights, ctx.bounds, ctx.unit_gates, ctx.k = params, n_weights, bounds, unit_gates, k
        ctx.n_tokens = n_tokens
        return out

    @staticmethod
    def backward(ctx, grad):
        # Whole-slot passes (one gather, one scatter, one dot product) around a loop of nothing but
        # the expert products: on a GPU every per-expert call is a kernel launch, and these are
        # what the fixed cost of an MoE layer is made of.
        xs, slot_token, gates = ctx.saved_tensors
        weights, biases = ctx.params[: ctx.n_weights], ctx.params[ctx.n_weights :]
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_w = ctx.needs_input_grad[6 : 6 + ctx.n_weights]
        need_b = ctx.needs_input_grad[6 + ctx.n_weights :]
        k, unit = ctx.k, ctx.unit_gates
        gs = grad.contiguous().index_select(0, slot_token)  # upstream gradient of each slot
        scale = None if unit else gates.to(gs.dtype).unsqueeze(1)
        gs_w = gs if unit else gs * scale  # ... times its gate: what the weights see
        hs = gs.new_empty(xs.shape) if (need_x or need_gates) else None  # g W_e: dx before the gate
        bias_dots = gs.new_empty(xs.shape[0]) if (need_gates and biases) else None
        grad_w: list[Optional[torch.Tensor]] = [None] * len(weights)
        grad_b: list[Optional[torch.Tensor]] = [None] * len(biases)
        bounds = ctx.bounds
        for e in range(len(bounds) - 1):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                g = gs[lo:hi]
                if hs is not None:
                    torch.mm(g, weights[e].to(g.dtype), out=hs[lo:hi])
                if bias_dots is not None:
                    torch.mv(g, biases[e].to(g.dtype), out=bias_dots[lo:hi])
            # Computed even for an expert without rows (a zero gradient, not None).
            if need_w[e]:
                grad_w[e] = (gs_w[lo:hi].t() @ xs[lo:hi]).to(weights[e].dtype)
            if biases and need_b[e]:
                grad_b[e] = gs_w[lo:hi].sum(0).to(biases[e].dtype)
        grad_gates = None
        if need_gates:  # <g, W x + b> without the expert output: <g W, x> + <g, b>
            dots = torch.linalg.vecdot(hs, xs)
            if bias_dots is not None:
                dots += bias_dots
            grad_gates = dots.to(gates.dtype)
        grad_x = None
        if need_x:
            if scale is not None:
                hs.mul_(scale)
            grad_x = _to_token_order(hs, slot_token, ctx.n_tokens, k)
        return (grad_x, None, grad_gates, None, None, None, *grad_w, *grad_b)


def _forward_rows(x, xs, slot_token, gates, bounds, unit_gates, k, weights, biases) -> torch.Tensor:
    """Each expert's product written into its rows of one expert-ordered buffer, then one scatter
    to token order: the fewest calls per expert, which is what a GPU needs."""
    ys = x.new_empty(xs.shape[0], weights[0].shape[0])
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        w = weights[e].to(x.dtype).t()
        if biases:
            torch.addmm(biases[e].to(x.dtype), xs[lo:hi], w, out=ys[lo:hi])
        else:
            torch.mm(xs[lo:hi], w, out=ys[lo:hi])
    if not unit_gates:
        ys.mul_(gates.to(ys.dtype).unsqueeze(1))
    return _to_token_order(ys, slot_token, x.shape[0], k)


def _forward_blocks(x, xs, slot_token, gates, bounds, unit_gates, k, blocks_of, weights, biases) -> torch.Tensor:
    """CPU: expert ``e``'s product as a batch of ``blocks_of[e]`` column blocks (:func:`_column_blocks`),
    scattered to token order while it is still in cache."""
    n_tokens = x.shape[0]
    n_out, n_in = weights[0].shape
    # k == 1: every token has one slot, so the experts' rows land on disjoint output rows and
    # are copied straight in; k > 1: a token's slots sit with several experts and are summed.
    out = x.new_empty(n_tokens, n_out) if k == 1 else x.new_zeros(n_tokens, n_out)
    for e in range(len(bounds) - 1):
        lo, hi, blocks = bounds[e], bounds[e + 1], blocks_of[e]
        x_e = xs[lo:hi].expand(blocks, hi - lo, n_in)
        w = weights[e].to(x.dtype).reshape(blocks, n_out // blocks, n_in).transpose(1, 2)
        if biases:
            y = torch.baddbmm(biases[e].to(x.dtype).view(blocks, 1, -1), x_e, w)
        else:
            y = torch.bmm(x_e, w)
        if not unit_gates:
            y.mul_(gates[lo:hi].to(y.dtype).view(1, -1, 1))
        y = y.transpose(0, 1)  # [rows, blocks, n_out / blocks]
        if k == 1:  # the output viewed as equal column blocks: [tokens, blocks, n_out / blocks]
            out.view(n_tokens, blocks, n_out // blocks).index_copy_(0, slot_token[lo:hi], y)
        else:  # index_add_ is ~3x slower on the strided blocks than on whole rows
            out.index_add_(0, slot_token[lo:hi], y.reshape(hi - lo, n_out))
    return out


def _to_token_order(rows: torch.Tensor, slot_token: torch.Tensor, n_tokens: int, k: int) -> torch.Tensor:
    """Rows in expert order -> ``[n_tokens, width]``: copied (k == 1, one slot per token) or summed."""
    shape = (n_tokens, rows.shape[1])
    if k == 1:
        return rows.new_empty(shape).index_copy_(0, slot_token, rows)
    return rows.new_zeros(shape).index_add_(0, slot_token, rows)


def _column_blocks(x: torch.Tensor, n_out: int, rows: int) -> int:
    """How many column blocks the CPU forward splits an expert's product on ``rows`` rows into
    (1 on GPU, where one product per expert is the right call).

    A multiple of the intra-op threads, so each thread runs whole blocks, and the fewest that make
    blocks at most ``max(512, 2 * rows)`` columns wide, but none narrower than 128. Measured on
    1024 -> 4096 (AMD EPYC, AVX2, 2 threads), each variant against the dense product on all 2048
    rows: at 256 rows, one ``addmm`` per expert 1.17x (1 thread), blocks 2048 wide (one per
    thread) 1.09-1.11x, 1024 wide 1.02-1.05x, 512 wide 0.97-0.99x, narrower no better; at 512
    rows, 2048 wide 1.04-1.06x, 1024 wide 0.98-1.02x, 512 wide 0.97-1.00x; at 1024 rows 2048 wide
    0.99-1.00x, 512 wide 1.03-1.04x. Narrow blocks keep each block's share of the weight in
    cache while few rows use it; more rows repay wider ones.
    """
    if x.device.type != "cpu":
        return 1
    threads = torch.get_num_threads()
    widest = max(512, 2 * rows)
    blocks = 1
    for b in range(threads, n_out + 1, threads):
        if b > threads and n_out // b < 128:
            break
        if n_out % b == 0:
            blocks = b
            if n_out // b <= widest:
                break
    return blocks


def grouped_linear(
    x: torch.Tensor,
    slot_token: torch.Tensor,
    counts: Sequence[int],
    gates: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[torch.Tensor]] = None,
    *,
    unit_gates: bool = False,
) -> torch.Tensor:
    """``out[t] = sum over slots j of token t: gates[j] * (x[t] @ W_e(j).T + b_e(j))``.

    ``x`` ``[N, in]`` in token order; ``slot_token`` ``[N*k]`` the token of each routed slot, sorted
    so that expert ``e`` owns the ``counts[e]`` consecutive slots after those of experts ``< e``;
    ``gates`` ``[N*k]`` in the same order. ``unit_gates=True`` promises the gates equal 1 (the
    straight-through top-1 gate ``p / stopgrad(p)``): the multiply is skipped, their gradient is not.
    """
    if len(weights) != len(counts):
        raise ValueError(f"{len(weights)} expert weights but {len(counts)} counts")
    if sum(counts) != slot_token.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but there are {slot_token.shape[0]} slots")
    biases = [] if biases is None else list(biases)
    missing = sum(b is None for b in biases)
    if 0 < missing < len(biases):  # dropping the others' biases would silently change the output
        raise ValueError(f"{missing} of {len(biases)} experts have no bias: all experts need one, or none")
    if missing:
        biases = []
    device = x.device.type
    if torch.is_autocast_enabled(device):  # as autocast runs a Linear: the input and weights in its dtype
        with torch.autocast(device, enabled=False):
            return _GroupedLinear.apply(x.to(torch.get_autocast_dtype(device)), slot_token, gates, list(counts),
                                        unit_gates, len(weights), *weights, *biases)
    return _GroupedLinear.apply(x, slot_token, gates, list(counts), unit_gates, len(weights), *weights, *biases)
