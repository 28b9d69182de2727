"""sentence-transformers' own description of a clp-ray model folder, written beside ``clp_ray.json``.

With these files ``SentenceTransformer(folder)`` embeds exactly as :meth:`Embedder.encode` does:

- ``modules.json``: Transformer -> Pooling (``cls``/``mean``) -> Normalize (when normalised). An MoE
  folder names clp-ray's own Transformer module (:class:`clp_ray.model.st_module.MoETransformer`, loaded
  with ``trust_remote_code=True``: sentence-transformers 6 asks for it before importing a module
  class from outside its own package), which rebuilds the experts from ``clp_ray.json``.
- ``sentence_bert_config.json``: ``query_length`` / ``document_length`` (what ``encode_query`` and
  ``encode_document`` truncate at) and ``max_seq_length`` (the passage length, for plain ``encode``).
- ``config_sentence_transformers.json``: the query/passage prefixes as the ``query`` and ``document``
  prompts, which ``encode_query`` / ``encode_document`` prepend.

No sentence-transformers import here: saving a model does not need it installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from clp_ray.model.settings import EmbedSettings

ST_TRANSFORMER = "sentence_transformers.models.Transformer"
MOE_TRANSFORMER = "clp_ray.model.st_module.MoETransformer"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"


def write_sentence_transformers_files(folder: str | Path, settings: EmbedSettings, dim: int, *, moe: bool,
                                      versions: Optional[dict] = None) -> None:
    """Write the sentence-transformers files for a model folder whose weights are already there."""
    root = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": MOE_TRANSFORMER if moe else ST_TRANSFORMER},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]
    if settings.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"})
    _write_json(root / "modules.json", modules)
    (root / POOLING_DIR).mkdir(exist_ok=True)
    _write_json(root / POOLING_DIR / "config.json",
                {"embedding_dimension": dim, "pooling_mode": settings.pooling, "include_prompt": True})
    if settings.normalize:
        (root / NORMALIZE_DIR).mkdir(exist_ok=True)
    _write_json(root / "sentence_bert_config.json", {
        "max_seq_length": settings.passage_max_len, "do_lower_case": False,
        "query_length": settings.query_max_len, "document_length": settings.passage_max_len,
    })
    _write_json(root / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "prompts": {"query": settings.query_prefix, "document": settings.passage_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if settings.normalize else "dot",
        "__version__": versions or {},
    })


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
