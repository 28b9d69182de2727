"""The HTTP contract of the Serve app: OpenAI-compatible embeddings requests and answers.

``POST /v1/embeddings`` ``{"model": "clp-ray-hi", "input": ["...", ...] | "...",
"input_type": "query" | "passage"}`` answers ``{"object": "list", "data": [{"object": "embedding",
"index": i, "embedding": [...]}], "model": "clp-ray-hi", "usage": {...}}``. ``input_type`` is
clp-ray's addition (the prefix and max length used; queries by default); so is ``output``:
``dense`` (default), or for a model with BGE-M3's heads ``sparse`` (each ``embedding`` is then the
lexical weights ``{"token id": weight}``) or ``colbert`` (a list of token vectors).
``encoding_format``: ``float`` (default) or ``base64`` (each dense ``embedding`` the base64 of its
little-endian float32 bytes, as OpenAI sends it and as the official ``openai`` client asks for by
default). ``dimensions`` (OpenAI's shortened embeddings) is refused with a 400 naming the reason
unless it equals the model's own dimension: no clp-ray model is trained for truncation yet.
``user`` is accepted and not used. ``model`` names the served alias (``clp-ray-hi`` or ``hi``), a
version (``clp-ray-hi/3``) or another alias (``clp-ray-hi@challenger``); the answer's ``model``
names the version that made the vectors (``clp-ray-hi/3``). Errors are ``{"error": {"message", "type", "param", "code"}}`` as OpenAI's are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clp_ray.util.unicode_text import SURROGATE, first_invalid


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: Union[str, list[str]]
    input_type: Literal["query", "passage"] = "query"
    output: Literal["dense", "sparse", "colbert"] = "dense"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None  # accepted (OpenAI clients send it), not used

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[str, list[float], dict[str, float], list[list[float]]]  # base64 | dense | sparse | colbert


def encode_base64(vector) -> str:
    """OpenAI's ``encoding_format: base64``: the little-endian float32 bytes, base64-encoded."""
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ApiError(Exception):
    """An answer other than 200: ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class RequestLimits:
    """How much one request may ask for (the ``serve`` section's limits)."""

    max_inputs: int = 256
    max_chars: int = 1_000_000
    max_bytes: int = 8 * 1024 * 1024


def parse_request(raw: bytes, limits: RequestLimits) -> EmbeddingRequest:
    """The request in ``raw``, or an :class:`ApiError` (400, or 413 over a size limit) that says what is wrong."""
    if len(raw) > limits.max_bytes:
        raise ApiError(413, f"the request body is {len(raw)} bytes; this service takes at most {limits.max_bytes} "
                       "(serve.max_request_bytes): split the input over several requests", code="request_too_large")
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if isinstance(payload, dict) and isinstance(payload.get("input"), list):
        bad = next((i for i, t in enumerate(payload["input"]) if not isinstance(t, str)), None)
        if bad is not None:  # say which item, not pydantic's account of the str | list[str] union
            raise ApiError(400, f"input[{bad}]: expected a string, got {type(payload['input'][bad]).__name__}",
                           param=f"input[{bad}]")
    try:
        req = EmbeddingRequest.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    texts = req.texts()
    if not texts:
        raise ApiError(400, "input: give at least one text", param="input")
    if len(texts) > limits.max_inputs:
        raise ApiError(400, f"input: at most {limits.max_inputs} texts per request (serve.max_inputs_per_request), "
                       f"got {len(texts)}", param="input")
    chars = sum(len(t) for t in texts)
    if chars > limits.max_chars:
        raise ApiError(413, f"input: {chars} characters in all; this service takes at most {limits.max_chars} per "
                       "request (serve.max_chars_per_request): split the input over several requests",
                       param="input", code="request_too_large")
    if req.encoding_format == "base64" and req.output != "dense":
        raise ApiError(400, f"encoding_format: base64 encodes dense vectors; output {req.output} is not one "
                       "(use encoding_format float)", param="encoding_format")
    if any(not t for t in texts):
        raise ApiError(400, "input: texts must not be empty strings", param="input")
    bad = first_invalid(texts)
    if bad is not None:
        where = "input" if isinstance(req.input, str) else f"input[{bad}]"
        raise ApiError(400, f"{where}: {SURROGATE}", param=where)
    return req


MODEL_REF = re.compile(r"^(?P<name>[^/@\s]+)(?:/(?P<version>[1-9][0-9]*)|@(?P<alias>[A-Za-z0-9_-]+))?$")


@dataclass(frozen=True)
class ModelRef:
    """A request's ``model``: a name (registered name or language code), optionally pinned."""

    name: str
    version: Optional[str] = None  # clp-ray-hi/3
    alias: Optional[str] = None  # clp-ray-hi@challenger


def parse_model(model: str) -> ModelRef:
    """``clp-ray-hi``, ``clp-ray-hi/3`` or ``clp-ray-hi@challenger``; anything else is a 400."""
    m = MODEL_REF.match(model.strip())
    if m is None:
        raise ApiError(400, f"model: {model!r} is not a model name, name/version (clp-ray-hi/3) or name@alias "
                       "(clp-ray-hi@challenger)", param="model")
    return ModelRef(m["name"], m["version"], m["alias"])
