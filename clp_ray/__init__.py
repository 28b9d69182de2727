"""clp-ray: CLP fine-tuning, MoE upcycling and hyperparameter search for multilingual embedders.

The packages, bottom up: ``util`` (plumbing) -> ``config`` -> ``model`` -> ``data`` -> ``loss``,
``evaluation`` -> ``tracking`` -> ``train``, ``mining``, ``serving`` -> ``tune`` -> ``ablation``;
``cli`` and ``cluster`` serve the ``jobs/`` entry points. The names the README shows are here too.
"""

from clp_ray import _moved
from clp_ray.util.lazy import lazy_exports

_moved.install()

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "model.embedder": ["Embedder"],
    "model.moe": ["upcycle"],
    "loss.clp": ["clp_loss"],
})
