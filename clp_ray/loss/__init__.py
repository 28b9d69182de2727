"""The training losses, one file each with its math: CLP (:mod:`.clp`), BGE-M3's unified loss
(:mod:`.m3`), the MoE router's auxiliary loss (:mod:`.router`), and the objective that combines
them for one batch (:mod:`.objective`)."""

from clp_ray.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "clp": ["clp_loss"],
    "objective": ["CLPObjective"],
    "router": ["router_loss", "router_stats"],
})
