"""Mixture-of-experts upcycling of a BERT-family encoder's feed-forward Linear.

``upcycle(encoder, layers=[i, ...], site="intermediate", num_experts=E, top_k=k)`` replaces
``layer[i].<site>.dense`` by a :class:`MoEFeedForward` whose ``E`` experts are copies of that Linear
and whose ``router`` (``hidden -> E``) is new. Sizes are read from the Linear itself.

Routing (per token ``x``): ``p = softmax(router(x))`` in fp32, pick the top-k experts, then

- top-1, ``straight_through`` (default): ``y = E_i(x) * p_i / stopgrad(p_i)``. The forward value is
  exactly ``E_i(x)``, so at init the upcycled encoder equals the dense one, yet ``dL/dp_i`` is
  non-zero and the router trains. (Renormalising a single selected gate gives 1.0 and no gradient:
  the CLP research code's router never trained.)
- top-1, ``switch``: ``y = p_i * E_i(x)`` (Switch Transformer); trains the router but scales the
  output by ``p_i`` at init.
- top-k > 1: ``y = sum_j w_j E_j(x)`` with the selected probabilities renormalised to sum to 1,
  which also reduces to the dense output at init (all experts are equal copies).

Auxiliary losses (Switch Transformer, Fedus et al. 2021; ST-MoE z-loss, Zoph et al. 2022), computed
over non-padding tokens only:

- load balancing ``E * sum_i f_i * P_i`` where ``f_i`` is the fraction of routed (token, slot)
  assignments that went to expert ``i`` and ``P_i`` the mean router probability of expert ``i``;
  it is 1.0 for perfectly uniform routing.
- router z-loss ``mean(logsumexp(logits)^2)``.

Every forward stores them on the layer; :func:`clp_ray.loss.router.router_loss` collects ``balance_coef * balance +
z_coef * z`` from all MoE layers of a model and :func:`router_stats` the per-expert token fractions
and router entropy for logging. Padding is excluded by wrapping the encoder call in
``with token_mask(model, attention_mask):``.

Example::

    >>> enc = transformers.AutoModel.from_pretrained("BAAI/bge-m3")
    >>> upcycle(enc, layers=[23], num_experts=4, top_k=1)
    >>> out = enc(**batch); loss = task_loss + router_loss(enc)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from clp_ray.config.moe_spec import MoESpec, RouterSettings, Site
from clp_ray.model.grouped_linear import grouped_linear

TrainOnly = Literal["moe", "site", "ffn", "all"]


@dataclass
class RouterAux:
    """What one MoE forward leaves behind for the training loss and for logging."""

    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_fraction: torch.Tensor  # [E], detached
    entropy: torch.Tensor  # scalar, detached: mean per-token entropy of the router distribution
    tokens: torch.Tensor  # scalar: how many (non-padding) tokens these were computed over
    # The sums the means above are taken from, so that forwards over parts of one batch combine
    # into exactly the whole batch's losses (:func:`combine_aux`, gradient caching).
    slot_counts: Optional[torch.Tensor] = None  # [E] detached: (token, slot) assignments per expert
    prob_sum: Optional[torch.Tensor] = None  # [E]: summed router probabilities over the tokens
    lse_sq_sum: Optional[torch.Tensor] = None  # summed logsumexp(logits)^2
    entropy_sum: Optional[torch.Tensor] = None  # detached


class Router(nn.Linear):
    """``hidden -> num_experts`` logits, always computed in fp32 (small logit gaps decide routing,
    and bf16 would round them away). A module of its own so ZeRO-3 gathers its weight on call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class MoEFeedForward(nn.Module):
    """Drop-in replacement for an ``nn.Linear`` with ``num_experts`` routed copies of it."""

    def __init__(self, dense: nn.Linear, num_experts: int, top_k: int = 1, **router):
        """``router``: any :class:`~clp_ray.config.moe_spec.RouterSettings` field (defaults declared there)."""
        super().__init__()
        if not isinstance(dense, nn.Linear):
            raise TypeError(f"can only upcycle nn.Linear, got {type(dense).__name__}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        settings = RouterSettings(**router)
        self.in_features = dense.in_features
        self.out_features = dense.out_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.balance_coef = settings.balance_coef
        self.z_coef = settings.z_coef
        self.jitter = settings.jitter
        self.top1_gate = settings.top1_gate
        # The router is kept and computed in fp32: small logit differences decide the routing.
        self.router = Router(self.in_features, num_experts, bias=False, device=dense.weight.device, dtype=torch.float32)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = nn.ModuleList(copy.deepcopy(dense) for _ in range(num_experts))
        self.aux: Optional[RouterAux] = None
        self._token_mask: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}"

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits, probabilities, chosen experts ``[N, k]`` and their gates ``[N, k]``."""
        h32 = h.float()
        if self.training and self.jitter > 0:
            h32 = h32 * torch.empty_like(h32).uniform_(1 - self.jitter, 1 + self.jitter)
        logits = self.router(h32)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gates = top_p / top_p.sum(dim=-1, keepdim=True)
        elif self.top1_gate == "straight_through":
            gates = top_p / top_p.detach()
        else:
            gates = top_p
        return logits, probs, top_i, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        logits, probs, top_i, gates = self.route(h)
        st = self.top_k == 1 and self.top1_gate == "straight_through"
        # Before dispatch, whose per-expert row counts wait for the GPU: queued ahead of that wait,
        # these small kernels run while the host waits instead of after it.
        self.aux = self._aux(logits, probs, top_i, lead)
        out = dispatch(h, top_i, gates, self.experts, unit_gates=st)
        return out.reshape(*lead, self.out_features)

    def _aux(self, logits: torch.Tensor, probs: torch.Tensor, top_i: torch.Tensor, lead: torch.Size) -> RouterAux:
        # Padding is weighted out rather than indexed out: boolean indexing would make the host
        # wait for the GPU to count the real tokens.
        mask = self._token_mask
        w = mask.reshape(-1).to(probs.dtype) if mask is not None and tuple(mask.shape) == tuple(lead) else None
        lse = torch.logsumexp(logits, dim=-1)
        slot_w = None if w is None else w.unsqueeze(1).expand(-1, self.top_k).reshape(-1)
        counts = expert_counts(top_i.reshape(-1), self.num_experts, slot_w).float()
        if w is None:
            n = torch.full((), probs.shape[0], device=probs.device, dtype=probs.dtype)
            prob_sum, lse_sq_sum = probs.sum(dim=0), lse.square().sum()
        else:
            n = w.sum()
            prob_sum, lse_sq_sum = w @ probs, w @ lse.square()
        with torch.no_grad():  # H = logsumexp(l) - sum_i p_i l_i
            ent = lse - torch.linalg.vecdot(probs, logits)
            ent_sum = ent.sum() if w is None else w @ ent
        return aux_from_sums(self.num_experts, counts, n, prob_sum, lse_sq_sum, ent_sum)


def aux_from_sums(num_experts: int, counts: torch.Tensor, n: torch.Tensor, prob_sum: torch.Tensor,
                  lse_sq_sum: torch.Tensor, entropy_sum: torch.Tensor) -> RouterAux:
    """The losses and statistics of tokens whose per-expert sums these are (a batch of padding
    alone gives 0 for every term)."""
    per_token = n.clamp_min(1)
    frac = counts / counts.sum().clamp_min(1)
    balance = num_experts * (frac * (prob_sum / per_token)).sum()
    return RouterAux(balance, lse_sq_sum / per_token, frac.detach(), (entropy_sum / per_token).detach(), n.detach().long(),
                     counts.detach(), prob_sum, lse_sq_sum, entropy_sum.detach())


def combine_aux(num_experts: int, parts: list[RouterAux]) -> RouterAux:
    """The :class:`RouterAux` of one batch from those of its parts (disjoint token sets): the
    expert fractions and mean probabilities are over all the tokens, so the balance and z losses,
    values and gradients, equal one forward over the whole batch."""
    def total(name: str) -> torch.Tensor:
        return torch.stack([getattr(a, name) for a in parts]).sum(0)

    n = torch.stack([a.tokens.to(a.prob_sum.dtype) for a in parts]).sum()
    return aux_from_sums(num_experts, total("slot_counts"), n, total("prob_sum"), total("lse_sq_sum"), total("entropy_sum"))


def dispatch(
    h: torch.Tensor,
    top_i: torch.Tensor,
    gates: torch.Tensor,
    experts: nn.ModuleList,
    *,
    unit_gates: bool = False,
) -> torch.Tensor:
    """Vectorised dispatch: sort the (token, slot) pairs by expert, run each expert once on its
    contiguous rows and scatter the gated outputs back (:func:`clp_ray.model.grouped_linear.grouped_linear`).
    No loop over tokens.

    ``unit_gates`` (top-1 straight-through): the gates are ``p / stopgrad(p)``, exactly 1, so the
    forward skips the multiply while the router still gets its gradient.
    """
    n, k = top_i.shape
    flat_e = top_i.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    # Every expert is in the grouped call, even with zero rows: its parameters then get a zero
    # gradient instead of None, so data-parallel gradient buckets have the same size on every rank.
    counts = expert_counts(flat_e, len(experts)).tolist()  # the host waits for the GPU here
    slot_token = order // k if k > 1 else order
    return grouped_linear(
        h, slot_token, counts, gates.reshape(-1).index_select(0, order),
        [ex.weight for ex in experts], [ex.bias for ex in experts], unit_gates=unit_gates,
    )


def expert_counts(expert: torch.Tensor, num_experts: int, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[num_experts]`` counts (int64; or the summed ``weight``) of the expert ids in ``expert``.
    Not ``torch.bincount``: on a GPU it reads the largest id back to the host to size its output."""
    if weight is None:
        weight = torch.ones_like(expert)
    return weight.new_zeros(num_experts).scatter_add_(0, expert, weight)


def dispatch_naive(
    h: torch.Tensor, top_i: torch.Tensor, gates: torch.Tensor, experts: nn.ModuleList, out_features: int
) -> torch.Tensor:
    """Reference implementation: every expert on every token, masked. For parity tests and benchmarks."""
    out = torch.zeros(h.shape[0], out_features, dtype=h.dtype, device=h.device)
    for e, expert in enumerate(experts):
        weight = (gates * (top_i == e)).sum(-1, keepdim=True)
        out = out + weight * expert(h)
    return out


# --------------------------------------------------------------------------------------------
# Model surgery.


def find_encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer layers: every entry has ``intermediate.dense`` and
    ``output.dense`` (BERT, RoBERTa, XLM-R, MiniLM, ...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(m.output, "dense") for m in module
        ):
            return module
    raise ValueError(
        f"{type(model).__name__} has no BERT-family encoder layers (a ModuleList whose layers have "
        "intermediate.dense and output.dense)"
    )


def normalize_layer_indices(layers: list[int], num_layers: int) -> list[int]:
    out = []
    for i in layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"MoE layer index {i} is out of range for an encoder with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1} or -{num_layers}..-1)")
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"MoE layer indices {layers} name the same layer twice")
    return sorted(out)


def upcycle(model: nn.Module, layers: list[int], site: Site = MoESpec.site, num_experts: int = MoESpec.num_experts,
            top_k: int = MoESpec.top_k, **router) -> MoESpec:
    """Replace ``layer[i].<site>.dense`` by a :class:`MoEFeedForward` for every ``i`` in ``layers``
    (``router``: :class:`~clp_ray.config.moe_spec.RouterSettings` fields).

    Returns the :class:`MoESpec` (with non-negative layer indices) that rebuilds this structure.
    """
    if site not in ("intermediate", "output"):
        raise ValueError(f"site must be 'intermediate' or 'output', got {site!r}")
    encoder_layers = find_encoder_layers(model)
    idx = normalize_layer_indices(list(layers), len(encoder_layers))
    for i in idx:
        parent = getattr(encoder_layers[i], site)
        if isinstance(parent.dense, MoEFeedForward):
            raise ValueError(f"layer {i} {site}.dense is already an MoE layer")
        parent.dense = MoEFeedForward(parent.dense, num_experts, top_k, **router)
    return MoESpec(idx, site, num_experts, top_k, **RouterSettings(**router).__dict__)


def apply_spec(model: nn.Module, spec: MoESpec) -> MoESpec:
    """Upcycle ``model`` as ``spec`` describes (a saved folder's, or ``MoESpec.from_config``'s)."""
    return upcycle(model, spec.layers, spec.site, spec.num_experts, spec.top_k, **spec.router.__dict__)


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def moe_spec_of(model: nn.Module) -> Optional[MoESpec]:
    """The :class:`MoESpec` that rebuilds the MoE layers ``model`` holds, read from the modules
    themselves (however they were upcycled); None for a dense model. Raises ``ValueError`` when the
    layers differ in a way one spec cannot describe (two sites, different expert counts, ...)."""
    found = []
    for i, layer in enumerate(find_encoder_layers(model)):
        for site in ("intermediate", "output"):
            m = getattr(getattr(layer, site), "dense", None)
            if isinstance(m, MoEFeedForward):
                found.append((i, site, (m.num_experts, m.top_k, m.balance_coef, m.z_coef, m.jitter, m.top1_gate)))
    if len(found) != len(moe_layers(model)):
        raise ValueError("the model has MoE layers outside the encoder layers' intermediate/output Linear")
    if not found:
        return None
    shapes = {(site, settings) for _, site, settings in found}
    if len(shapes) > 1:
        raise ValueError(f"the MoE layers differ (layer, site, (experts, top_k, router settings)): {found}; "
                         "one saved spec describes identical layers only")
    (site, (experts, top_k, balance, z, jitter, gate)), = shapes
    return MoESpec([i for i, _, _ in found], site, experts, top_k, balance, z, jitter, gate)


@contextmanager
def token_mask(model: nn.Module, attention_mask: Optional[torch.Tensor]) -> Iterator[None]:
    """Tell every MoE layer which tokens are real, so padding stays out of the router losses."""
    layers = [m for _, m in moe_layers(model)]
    for m in layers:
        m._token_mask = attention_mask
    try:
        yield
    finally:
        for m in layers:
            m._token_mask = None


# --------------------------------------------------------------------------------------------
# Which parameters train.


def apply_train_only(model: nn.Module, policy: TrainOnly, *, layers: Optional[list[int]] = None,
                     site: Site = MoESpec.site) -> tuple[int, int]:
    """Set ``requires_grad``: ``moe`` = experts + routers only (the paper), ``site`` = the
    ``<site>.dense`` of ``layers`` (a dense Linear, or the MoE layer that replaced it: with MoE off,
    the weights upcycling would copy), ``ffn`` = every layer's feed-forward block (intermediate +
    output, MoE included), ``all`` = everything.

    Returns (trainable, total) parameter counts.
    """
    if policy not in ("moe", "site", "ffn", "all"):
        raise ValueError(f"train_only must be moe, site, ffn or all, got {policy!r}")
    for p in model.parameters():
        p.requires_grad_(policy == "all")
    if policy == "moe":
        found = moe_layers(model)
        if not found:
            raise ValueError("train_only='moe' but the model has no MoE layers (is moe.enabled false?)")
        for _, m in found:
            m.requires_grad_(True)
    elif policy == "site":
        if layers is None:
            raise ValueError("train_only='site' needs the layers (moe.layers)")
        enc = find_encoder_layers(model)
        for i in normalize_layer_indices(layers, len(enc)):
            getattr(enc[i], site).dense.requires_grad_(True)
    elif policy == "ffn":
        for layer in find_encoder_layers(model):
            layer.intermediate.requires_grad_(True)
            layer.output.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def effective_train_only(moe_cfg) -> TrainOnly:
    """The policy a run applies: ``moe.train_only``, except that with MoE off ``moe`` (nothing to
    train) becomes ``all``."""
    if moe_cfg.enabled:
        return moe_cfg.train_only
    return "all" if moe_cfg.train_only == "moe" else moe_cfg.train_only


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to hand to the optimizer: frozen ones get no optimizer state."""
    return [p for p in model.parameters() if p.requires_grad]
