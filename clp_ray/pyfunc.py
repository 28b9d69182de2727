"""The registered model's Python side: an MLflow pyfunc wrapping an Embedder folder.

``mlflow.pyfunc.load_model(uri).predict(["text", ...])`` returns float32 ``[N, D]`` embeddings; the
Embedder folder (MoE layers and settings included) is the model's ``embedder`` artifact. Its class
path (``clp_ray.pyfunc.EmbedderPyfunc``, re-exported as ``clp_ray.tracking.EmbedderPyfunc`` for
models registered before it moved) is what MLflow unpickles, so it stays importable there.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np

PREDICT_BATCH_SIZE = 32  # texts per forward pass unless predict gets params={"batch_size": N}
# What the texts are unless predict gets params={"kind": "passage"}: it picks the model's prefix
# (E5's "query: " / "passage: ") and max length. Queries are what a serving endpoint embeds most.
PREDICT_KIND = "query"

class EmbedderPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(["text", ...], params={"kind": "query"|"passage", "batch_size": N})`` -> float32
    ``[N, D]`` embeddings of the ``embedder`` artifact's Embedder."""

    def load_context(self, context):
        from clp_ray.modeling import Embedder  # torch and transformers: where a model is loaded, not on import

        self.embedder = Embedder.from_pretrained(context.artifacts["embedder"])

    # ``np.ndarray`` is what ``mlflow models serve`` hands over, and a hint MLflow infers no schema
    # from: a ``list[str]`` hint would make it infer a signature without the params schema (so
    # ``params=`` is dropped) and turn a multi-column DataFrame into its first column silently.
    # Lists and one-column DataFrames are accepted as well; _as_text_list checks the input.
    def predict(self, context, model_input: np.ndarray, params=None):
        texts = _as_text_list(model_input)
        params = params or {}
        batch_size = int(params.get("batch_size", PREDICT_BATCH_SIZE))
        kind = params.get("kind", PREDICT_KIND)
        if kind not in ("query", "passage"):
            raise ValueError(f"params['kind'] must be 'query' or 'passage', got {kind!r}")
        return self.embedder.encode(texts, batch_size=batch_size, kind=kind).numpy().astype("float32")


def _as_text_list(model_input) -> list[str]:
    # pandas input (e.g. from a serving endpoint): take its only column.
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):
        if len(model_input.columns) != 1:
            raise TypeError(f"expected one column of strings, got columns {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0].tolist()
    if isinstance(model_input, np.ndarray) and model_input.ndim == 1:
        model_input = model_input.tolist()
    if isinstance(model_input, str) or not isinstance(model_input, (list, tuple)):
        raise TypeError(f"predict expects a list of strings, got {type(model_input).__name__}")
    bad = [i for i, t in enumerate(model_input) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"predict expects a list of strings; item {bad[0]} is {type(model_input[bad[0]]).__name__}")
    return list(model_input)
