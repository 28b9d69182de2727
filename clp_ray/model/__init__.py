"""The embedding model: :class:`~clp_ray.model.embedder.Embedder` (encoder, pooling, settings),
MoE upcycling, BGE-M3's heads, model folders and references, the offline tiny/E5 models, export."""

from clp_ray.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "embedder": ["Embedder"],
    "moe": ["apply_train_only", "upcycle"],
    "settings": ["EmbedSettings"],
})
