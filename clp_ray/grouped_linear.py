"""Grouped expert Linear: E ``nn.Linear`` experts applied to their own tokens in one autograd node.

``grouped_linear(x, slot_token, counts, gates, weights, biases)`` computes, for every routed
(token, slot) pair ``j`` sorted by expert (``counts[e]`` consecutive slots per expert),
``out[slot_token[j]] += gate_j * (W_e x_{slot_token[j]} + b_e)``, and its gradients with respect to
``x``, the gates and every expert's weight and bias.

Why one hand-written node instead of calling each expert ``nn.Linear`` on a slice:

- The gated scatter to token order is fused into the expert loop: no ``[tokens, out]`` concatenation,
  gate multiply or gather pass of its own. For the straight-through top-1 gate (value exactly 1)
  the multiply is skipped altogether.
- The gate gradient ``<grad_t, y_j>`` is computed as ``<grad_t W_e, x_j> + <grad_t, b_e>``: the first
  factor is the input gradient the backward computes anyway, so the ``[tokens, out]`` expert output
  never has to be kept for the backward.
- On CPU the forward product of each expert runs as a batch of column blocks, one per thread
  (:func:`_column_blocks`).

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
        # k == 1: every token has one slot, so the experts' rows land on disjoint output rows and
        # are copied straight in; k > 1: a token's slots sit with several experts and are summed.
        n_out, n_in = weights[0].shape
        out = x.new_empty(n_tokens, n_out) if k == 1 else x.new_zeros(n_tokens, n_out)
        bounds = list(accumulate(counts, initial=0))
        blocks = _column_blocks(x, n_out)
        # The output viewed as `blocks` equal column blocks: [tokens, blocks, n_out / blocks].
        out_blocks = out.view(n_tokens, blocks, n_out // blocks)
        for e in range(len(counts)):
            lo, hi = bounds[e], bounds[e + 1]
            x_e = xs[lo:hi].expand(blocks, hi - lo, n_in)
            w = weights[e].to(x.dtype).reshape(blocks, n_out // blocks, n_in).transpose(1, 2)
            if biases:
                y = torch.baddbmm(biases[e].to(x.dtype).view(blocks, 1, -1), x_e, w)
            else:
                y = torch.bmm(x_e, w)
            if not unit_gates:
                y.mul_(gates[lo:hi].to(y.dtype).view(1, -1, 1))
            y = y.transpose(0, 1)  # [rows, blocks, n_out / blocks]
            if k == 1:
                out_blocks.index_copy_(0, slot_token[lo:hi], y)
            else:  # index_add_ is ~3x slower on the strided blocks than on whole rows
                out.index_add_(0, slot_token[lo:hi], y.reshape(hi - lo, n_out))
        ctx.save_for_backward(xs, slot_token, gates)
        # Parameters are held by reference, not saved: ZeRO-3 swaps their storage between the
        # forward and the backward (and gathers them again before this backward runs).
        ctx.params, ctx.n_weights, ctx.bounds, ctx.unit_gates, ctx.k = params, n_weights, bounds, unit_gates, k
        ctx.n_tokens = n_tokens
        return out

    @staticmethod
    def backward(ctx, grad):
        xs, slot_token, gates = ctx.saved_tensors
        weights, biases = ctx.params[: ctx.n_weights], ctx.params[ctx.n_weights :]
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_w = ctx.needs_input_grad[6 : 6 + ctx.n_weights]
        need_b = ctx.needs_input_grad[6 + ctx.n_weights :]
        grad = grad.contiguous()
        k, unit = ctx.k, ctx.unit_gates
        grad_x = None
        if need_x:
            shape = (ctx.n_tokens, xs.shape[1])
            grad_x = xs.new_empty(shape) if k == 1 else xs.new_zeros(shape)
        grad_gates = torch.empty_like(gates) if need_gates else None
        grad_w: list[Optional[torch.Tensor]] = [None] * len(weights)
        grad_b: list[Optional[torch.Tensor]] = [None] * len(biases)
        bounds = ctx.bounds
        for e in range(len(bounds) - 1):
            lo, hi = bounds[e], bounds[e + 1]
            x_e = xs[lo:hi]
            g = grad.index_select(0, slot_token[lo:hi])  # upstream gradient of this expert's slots
            h = g @ weights[e].to(g.dtype) if (need_x or need_gates) else None  # dx before the gate
            if need_gates:  # <g, W x + b> without the expert output: <g W, x> + <g, b>
                dots = torch.linalg.vecdot(h, x_e)
                if biases:
                    dots += g @ biases[e].to(g.dtype)
                grad_gates[lo:hi] = dots.to(grad_gates.dtype)
            if not unit:
                scale = gates[lo:hi].to(g.dtype).unsqueeze(1)
                g.mul_(scale)
                if h is not None:
                    h.mul_(scale)
            if need_x:
                if k == 1:
                    grad_x.index_copy_(0, slot_token[lo:hi], h)
                else:
                    grad_x.index_add_(0, slot_token[lo:hi], h)
            # Computed even for an expert without rows (a zero gradient, not None).
            if need_w[e]:
                grad_w[e] = (g.t() @ x_e).to(weights[e].dtype)
            if biases and need_b[e]:
                grad_b[e] = g.sum(0).to(biases[e].dtype)
        return (grad_x, None, grad_gates, None, None, None, *grad_w, *grad_b)


def _column_blocks(x: torch.Tensor, n_out: int) -> int:
    """How many column blocks the forward splits each expert's product into.

    On CPU, one BLAS call on an expert's few hundred rows divides poorly among threads (measured
    at 256 rows x 1024 -> 4096, 2 threads: 1.24x the time per row of the dense 2048-row product);
    a batched product of one column block per thread runs each block on its own thread (1.13x).
    At 2048 rows the two are equally fast, and on GPU a single product is the right call.
    """
    threads = torch.get_num_threads()
    return threads if x.device.type == "cpu" and threads > 1 and n_out % threads == 0 else 1


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
    return _GroupedLinear.apply(x, slot_token, gates, list(counts), unit_gates, len(weights), *weights, *biases)
