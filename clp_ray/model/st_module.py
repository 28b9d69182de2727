"""The sentence-transformers module an MoE folder's ``modules.json`` names.

``SentenceTransformer(folder, trust_remote_code=True)`` imports :class:`MoETransformer` (clp-ray must
be installed) instead of its own Transformer, whose ``AutoModel`` would load the dense architecture
and drop the experts and routers. Everything else (tokenizing, per-task lengths, prompts, pooling)
is sentence-transformers' own; only the encoder is built by clp-ray, with the MoE layers its
``clp_ray.json`` describes and every weight loaded strictly.
"""

from __future__ import annotations

from sentence_transformers.models import Transformer


class MoETransformer(Transformer):
    """sentence-transformers' Transformer with the encoder built by :func:`clp_ray.model.embedder.load_encoder`."""

    def _load_model(self, model_name_or_path, transformer_task, config, backend, is_peft_model, **model_kwargs):
        if backend != "torch" or transformer_task != "feature-extraction" or is_peft_model:
            raise ValueError(f"{model_name_or_path}: clp-ray MoE models load with the torch backend for "
                             f"feature extraction only (got backend={backend!r}, task={transformer_task!r})")
        from clp_ray.model.embedder import load_encoder

        return load_encoder(str(model_name_or_path))
