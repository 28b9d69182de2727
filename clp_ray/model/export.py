"""Export a model for use outside clp-ray: a sentence-transformers folder, or ONNX (dense models).

Both exports are checked before they are published: the exported model embeds a few probe texts
(short, long enough to be truncated, several scripts) and must agree with :meth:`Embedder.encode`
to ``PARITY_ATOL``; the folder appears atomically only then.

ONNX layout (``--format onnx``): ``model.onnx`` takes ``input_ids`` and ``attention_mask``
(int64 ``[batch, seq]``, both dynamic) and returns ``sentence_embedding`` ``[batch, dim]`` with the
pooling and the L2 normalisation inside the graph; the tokenizer files and ``clp_ray.json`` (the
prefixes and max lengths to tokenize with) sit beside it. A model with BGE-M3's heads also returns
``sparse_weights`` ``[batch, seq]`` (the ReLU lexical weight of each token: per token id take the
largest, drop CLS/EOS/PAD/UNK, as :func:`clp_ray.model.m3.sparse_vectors` does) and ``colbert_vectors``
``[batch, seq-1, D']`` (normalised, zero at padding; drop them there), and both ``.pt`` heads are
copied beside it. Every output is parity-checked. MoE models are refused: their
token-routed expert dispatch has data-dependent shapes that ONNX export does not trace.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from clp_ray.errors import ClpRayError
from clp_ray.model.embedder import Embedder
from clp_ray.model.m3 import lexical_weights, save_heads, sparse_vectors, unused_token_ids
from clp_ray.model.moe import token_mask
from clp_ray.model.settings import META_FILE
from clp_ray.util.atomic import atomic_path
from clp_ray.util.output_guard import MARKER, mark_output

log = logging.getLogger(__name__)

Format = Literal["sentence-transformers", "onnx"]
FORMATS: tuple[str, ...] = ("sentence-transformers", "onnx")
PARITY_ATOL = 1e-5
ONNX_FILE = "model.onnx"
ONNX_OUTPUT = "sentence_embedding"
ONNX_M3_OUTPUTS = ("sparse_weights", "colbert_vectors")
ONNX_OPSET = 18
PROBE_TEXTS = ["셀 보호 해제", "How do I insert rows above?", "पासवर्ड कैसे बदलें", "x",
               "차트 데이터 범위를 바꾸는 방법과 서식을 유지하는 방법 " * 40]


@dataclass
class ExportResult:
    out: str
    format: str
    files: list[str]
    max_abs_diff: float  # exported model vs Embedder.encode on PROBE_TEXTS (query and passage)
    checked_with: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def export_model(embedder: Embedder, out: str | os.PathLike, fmt: Format = "sentence-transformers") -> ExportResult:
    if fmt not in FORMATS:
        raise ClpRayError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    return export_onnx(embedder, out) if fmt == "onnx" else export_sentence_transformers(embedder, out)


def export_sentence_transformers(embedder: Embedder, out: str | os.PathLike) -> ExportResult:
    """The model as a folder ``SentenceTransformer(out)`` loads (``trust_remote_code=True`` for MoE)."""
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        embedder.save_pretrained(tmp / "model")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:  # the check needs it, the folder does not
            diff, checker = float("nan"), "not checked (sentence-transformers is not installed)"
        else:
            st = SentenceTransformer(str(tmp / "model"), device="cpu", trust_remote_code=embedder.moe_spec is not None)
            diff = _max_diff(embedder, {"query": st.encode_query, "passage": st.encode_document})
            checker = "sentence-transformers"
        for f in (tmp / "model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "model").rmdir()
        mark_output(tmp, "export")  # a later export may replace this folder without --overwrite
    return ExportResult(str(out), "sentence-transformers", _files(out), diff, checker)


class _Pooled(nn.Module):
    """``(input_ids, attention_mask) -> embeddings``: the Embedder's forward, pooling and norm
    included; with BGE-M3's heads also the token weights and ColBERT vectors."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if self.embedder.heads is None:
            return self.embedder(input_ids=input_ids, attention_mask=attention_mask)
        with token_mask(self.embedder.encoder, attention_mask):
            hidden = self.embedder.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        heads = self.embedder.heads
        weights = heads.token_weights(hidden) * attention_mask.to(hidden.dtype)
        return (self.embedder._pool(hidden, attention_mask), weights,
                heads.token_vectors(hidden, attention_mask, self.embedder.normalize))


def export_onnx(embedder: Embedder, out: str | os.PathLike) -> ExportResult:
    """``model.onnx`` (pooling and normalisation inside) + tokenizer + settings; dense models only."""
    if embedder.moe_spec is not None:
        raise ClpRayError(f"ONNX export supports dense models only; this one has MoE layers ({embedder.moe_spec}): "
                          "token-routed experts have data-dependent shapes the ONNX exporter cannot trace. "
                          "Export it with --format sentence-transformers instead")
    ort = _onnxruntime()
    out = Path(out)
    module = _Pooled(embedder.float().eval()).cpu()
    example = embedder.tokenize(PROBE_TEXTS[:2], kind="passage")  # batch 2: torch.export specialises size-1 dims
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    outputs = [ONNX_OUTPUT, *(ONNX_M3_OUTPUTS if embedder.heads is not None else ())]
    with atomic_path(out, is_dir=True) as tmp:
        log.info("exporting %s to ONNX (opset %d)", type(embedder.encoder).__name__, ONNX_OPSET)
        try:
            torch.onnx.export(module, (example["input_ids"], example["attention_mask"]), str(tmp / ONNX_FILE),
                              input_names=["input_ids", "attention_mask"], output_names=outputs,
                              dynamic_shapes={"input_ids": dims, "attention_mask": dims}, opset_version=ONNX_OPSET,
                              dynamo=True, external_data=False, verbose=False)
        except Exception as e:  # the exporter's own error, shortened: which op or shape it could not handle
            raise ClpRayError(f"ONNX export of {type(embedder.encoder).__name__} failed: {str(e).strip().splitlines()[0]}") from None
        embedder.tokenizer.save_pretrained(tmp)
        meta = {**embedder.settings.to_dict(), "onnx": {"file": ONNX_FILE, "inputs": ["input_ids", "attention_mask"],
                                                        "output": ONNX_OUTPUT, "outputs": outputs, "opset": ONNX_OPSET}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if embedder.heads is not None:
            save_heads(embedder.heads, tmp)
        session = ort.InferenceSession(str(tmp / ONNX_FILE), providers=["CPUExecutionProvider"])
        diff = _max_diff(embedder, {k: _onnx_encoder(session, embedder, k) for k in ("query", "passage")})
        if embedder.heads is not None:
            diff = max(diff, _m3_diff(session, embedder))
        mark_output(tmp, "export")
    return ExportResult(str(out), "onnx", _files(out), diff, f"onnxruntime {ort.__version__}")


def _onnx_encoder(session, embedder: Embedder, kind: str):
    def encode(texts):
        enc = embedder.tokenize(texts, kind=kind)
        return session.run([ONNX_OUTPUT], {"input_ids": enc["input_ids"].numpy(),
                                           "attention_mask": enc["attention_mask"].numpy()})[0]
    return encode


def _m3_diff(session, embedder: Embedder) -> float:
    """Largest |ONNX - Embedder.encode| of the lexical weights and ColBERT vectors on the probe
    texts (the ONNX outputs post-processed as the module docstring says)."""
    enc = embedder.tokenize(PROBE_TEXTS, kind="passage")
    weights, vectors = session.run(list(ONNX_M3_OUTPUTS), {k: enc[k].numpy() for k in ("input_ids", "attention_mask")})
    ids, mask = torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"])
    sparse = lexical_weights(sparse_vectors(torch.from_numpy(weights), ids, mask, int(embedder.encoder.config.vocab_size),
                                            unused_token_ids(embedder.tokenizer)))
    expected = embedder.encode(PROBE_TEXTS, kind="passage", output=("sparse", "colbert"))
    worst = 0.0
    for i, (got, want) in enumerate(zip(sparse, expected.sparse)):
        if got.keys() != want.keys():
            raise ClpRayError(f"the exported sparse output weights other tokens than clp-ray's Embedder (probe {i}); "
                              "nothing was written")
        worst = max([worst, *(abs(got[t] - w) for t, w in want.items())])
        vecs = vectors[i][mask[i, 1:].bool().numpy()]
        worst = max(worst, float(np.abs(vecs - expected.colbert[i].numpy()).max()))
    if not worst <= PARITY_ATOL:
        raise ClpRayError(f"the exported sparse/ColBERT outputs differ from clp-ray's Embedder (max |diff| {worst:.3g} "
                          f"> {PARITY_ATOL}); nothing was written")
    return worst


def _onnxruntime():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ClpRayError(f"ONNX export needs {e.name}: pip install 'clp-ray[onnx]'") from None
    return onnxruntime


def _max_diff(embedder: Embedder, encoders: dict) -> float:
    """Largest |exported - Embedder.encode| over the probe texts; over PARITY_ATOL is an error."""
    worst = 0.0
    for kind, encode in encoders.items():
        expected = embedder.encode(PROBE_TEXTS, kind=kind).numpy()
        worst = max(worst, float(np.abs(np.asarray(encode(PROBE_TEXTS), dtype=np.float32) - expected).max()))
    if not worst <= PARITY_ATOL:
        raise ClpRayError(f"the exported model embeds differently from clp-ray's Embedder (max |diff| {worst:.3g} "
                          f"> {PARITY_ATOL}); nothing was written")
    return worst


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MARKER)
