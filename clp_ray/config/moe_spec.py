"""The MoE layout of a model, declared once (no torch here: the config imports it).

:class:`RouterSettings` holds the router's knobs and their defaults; :class:`MoESpec` is what
rebuilds a model's MoE layers (saved as ``clp_ray.json``'s ``moe``), built from the config with
:meth:`MoESpec.from_config`. ``moe.upcycle``, ``MoEFeedForward``, the ``moe.router`` config section
and the saved spec all take their defaults from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Site = Literal["intermediate", "output"]
TopOneGate = Literal["straight_through", "switch"]


@dataclass(frozen=True)
class RouterSettings:
    """Switch load-balancing and z-loss weights, multiplicative jitter, and the top-1 gate
    (``straight_through`` keeps the forward pass equal to the dense model at init while training the
    router; ``switch`` multiplies by the raw probability)."""

    balance_coef: float = 0.01
    z_coef: float = 0.001
    jitter: float = 0.0
    top1_gate: TopOneGate = "straight_through"


ROUTER_DEFAULTS = RouterSettings()
ROUTER_KEYS = tuple(f.name for f in fields(RouterSettings))


@dataclass
class MoESpec:
    """Everything needed to rebuild the MoE structure of a model (saved with it)."""

    layers: list[int]
    site: Site = "intermediate"
    num_experts: int = 2
    top_k: int = 1
    balance_coef: float = ROUTER_DEFAULTS.balance_coef
    z_coef: float = ROUTER_DEFAULTS.z_coef
    jitter: float = ROUTER_DEFAULTS.jitter
    top1_gate: TopOneGate = ROUTER_DEFAULTS.top1_gate

    @classmethod
    def from_config(cls, moe_cfg: Any) -> MoESpec:
        """The spec a ``moe`` config section describes (its layers as written, negative ones too)."""
        router = moe_cfg.router
        return cls(list(moe_cfg.layers), moe_cfg.site, moe_cfg.num_experts, moe_cfg.top_k,
                   **{k: getattr(router, k) for k in ROUTER_KEYS})

    @property
    def router(self) -> RouterSettings:
        return RouterSettings(**{k: getattr(self, k) for k in ROUTER_KEYS})

    def to_dict(self) -> dict:
        return asdict(self)
