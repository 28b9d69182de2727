"""The registered model's Python side: an MLflow pyfunc wrapping an Embedder folder.

``mlflow.pyfunc.load_model(uri).predict(["text", ...])`` returns float32 ``[N, D]`` embeddings
(``params={"output": "sparse"}``: per text BGE-M3's lexical weights ``{"token id": weight}``;
``"colbert"``: per text a float32 ``[tokens, D']`` array; both for models with BGE-M3's heads). The
Embedder folder (MoE layers and settings included) is the model's ``embedder`` artifact. Its class
path (``clp_ray.tracking.pyfunc.EmbedderPyfunc``, re-exported as ``clp_ray.tracking.runs.EmbedderPyfunc`` for
models registered before it moved) is what MLflow unpickles, so it stays importable there.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from clp_ray.util.unicode_text import SURROGATE, first_invalid

PREDICT_BATCH_SIZE = 32  # texts per forward pass unless predict gets params={"batch_size": N}
# What the texts are unless predict gets params={"kind": "passage"}: it picks the model's prefix
# (E5's "query: " / "passage: ") and max length. Queries are what a serving endpoint embeds most.
PREDICT_KIND = "query"
# The most texts one predict call embeds: a larger request is refused (a 400 from a serving
# endpoint) rather than holding the server for minutes.
MAX_PREDICT_TEXTS = 2048
PREDICT_OUTPUT = "dense"  # params={"output": "sparse" | "colbert"} for BGE-M3's other modes
OUTPUTS = ("dense", "sparse", "colbert")

class EmbedderPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(["text", ...], params={"kind": "query"|"passage", "batch_size": N, "output":
    "dense"|"sparse"|"colbert"})`` -> float32 ``[N, D]`` embeddings of the ``embedder`` artifact's
    Embedder, or its lexical weights / ColBERT vectors (see the module docstring)."""

    def load_context(self, context):
        from clp_ray.model.embedder import Embedder  # torch and transformers: where a model is loaded, not on import

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
            raise BadInput(f"params['kind'] must be 'query' or 'passage', got {kind!r}")
        if batch_size < 1:
            raise BadInput(f"params['batch_size'] must be >= 1, got {batch_size}")
        output = params.get("output", PREDICT_OUTPUT)
        if output not in OUTPUTS:
            raise BadInput(f"params['output'] must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if output not in self.embedder.modes:
            raise BadInput(f"params['output'] = {output!r}: this model has no {output} head (its modes: "
                           f"{', '.join(self.embedder.modes)})")
        result = self.embedder.encode(texts, batch_size=batch_size, kind=kind, output=output)
        if output == "sparse":
            from clp_ray.model.m3 import lexical_json  # torch: imported with the model, not on import

            return lexical_json(result)
        if output == "colbert":
            return [v.numpy().astype("float32") for v in result]
        return result.numpy().astype("float32")


class BadInput(MlflowException, TypeError, ValueError):
    """Input predict cannot embed. An MlflowException with INVALID_PARAMETER_VALUE is what
    MLflow's scoring server answers with a 400 carrying this message (any other error is a 400
    whose message only says the model failed); a TypeError / ValueError for callers that catch
    those (a wrong type, a wrong value)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _as_text_list(model_input) -> list[str]:
    # pandas input (e.g. from a serving endpoint): take its only column.
    if hasattr(model_input, "columns") and hasattr(model_input, "iloc"):
        if len(model_input.columns) != 1:
            raise BadInput(f"expected one column of strings, got columns {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0].tolist()
    # `mlflow models serve` hands {"inputs": [...]} over as a numpy array (of str, or of objects
    # when the items are mixed); a 2-D array is a list of lists, not texts.
    if isinstance(model_input, np.ndarray):
        if model_input.ndim == 0:
            raise BadInput(f"predict expects a list of strings, got a single {type(model_input.item()).__name__}: "
                           "wrap it in a list")
        if model_input.ndim != 1:
            raise BadInput(f"predict expects a list of strings, got an array of shape {list(model_input.shape)}")
        model_input = model_input.tolist()
    if isinstance(model_input, str) or not isinstance(model_input, (list, tuple)):
        raise BadInput(f"predict expects a list of strings, got {type(model_input).__name__}")
    bad = [i for i, t in enumerate(model_input) if not isinstance(t, str)]
    if bad:
        raise BadInput(f"predict expects a list of strings; item {bad[0]} is {type(model_input[bad[0]]).__name__}")
    if not model_input:
        raise BadInput("predict expects a non-empty list of strings, got an empty list")
    bad = first_invalid(model_input)
    if bad is not None:
        raise BadInput(f"predict expects text; item {bad} {SURROGATE}")
    if len(model_input) > MAX_PREDICT_TEXTS:
        raise BadInput(f"predict embeds at most {MAX_PREDICT_TEXTS} texts per call, got {len(model_input)}: "
                       "split the request")
    return list(model_input)
