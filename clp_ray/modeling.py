"""Embedder: a Hugging Face encoder + pooling + L2 normalisation, with MoE-aware save/load.

A saved folder is a normal Hugging Face model folder (``config.json``, weights, tokenizer) plus
``clp_ray.json`` (pooling, normalisation, max lengths and the :class:`~clp_ray.moe.MoESpec`).
``Embedder.from_pretrained`` rebuilds the encoder from its config, re-applies the MoE surgery and
loads every weight strictly, so routers and experts come back exactly; a folder without MoE layers
also loads in plain ``transformers``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clp_ray.atomic import atomic_path
from clp_ray.moe import MoESpec, moe_layers, token_mask, upcycle

log = logging.getLogger(__name__)

META_FILE = "clp_ray.json"
_FORMAT = 1


class Embedder(nn.Module):
    """Text embedding model. ``forward`` takes tokenized inputs and returns ``[B, D]`` embeddings;
    ``encode`` takes strings."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        *,
        pooling: str = "cls",
        normalize: bool = True,
        query_max_len: int = 64,
        passage_max_len: int = 256,
        moe_spec: Optional[MoESpec] = None,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.moe_spec = moe_spec

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides) -> Embedder:
        """Load a hub id or a local folder (including folders written by :meth:`save_pretrained`).

        ``overrides`` (pooling, normalize, query_max_len, passage_max_len) win over saved settings.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = Path(name_or_path)
        meta = _read_meta(path)
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        moe = meta.get("moe")
        if moe:
            config = AutoConfig.from_pretrained(str(path))
            encoder = AutoModel.from_config(config, add_pooling_layer=False)
            spec = MoESpec(**moe)
            upcycle(encoder, **spec.to_dict())
            _load_weights_strict(encoder, path)
        else:
            spec = None
            encoder = AutoModel.from_pretrained(str(name_or_path), add_pooling_layer=False)
        settings = {k: meta[k] for k in ("pooling", "normalize", "query_max_len", "passage_max_len") if k in meta}
        settings.update(overrides)
        # Eval mode, as transformers' from_pretrained leaves a model (the MoE branch builds the
        # encoder from its config, which starts in training mode with dropout on).
        return cls(encoder, tokenizer, moe_spec=spec, **settings).eval()

    def upcycle(self, layers: Sequence[int], site: str = "intermediate", num_experts: int = 2, top_k: int = 1, **router) -> MoESpec:
        """Upcycle encoder layers into MoE (see :func:`clp_ray.moe.upcycle`); remembered for saving."""
        if self.moe_spec is not None:
            raise ValueError(f"this Embedder is already upcycled ({self.moe_spec})")
        self.moe_spec = upcycle(self.encoder, list(layers), site, num_experts, top_k, **router)
        return self.moe_spec

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write a folder that :meth:`from_pretrained` restores exactly; atomic (temp + rename)."""
        out = Path(out_dir)
        with atomic_path(out, is_dir=True) as tmp:
            state = {k: v.detach().contiguous() for k, v in self.encoder.state_dict().items()}
            self.encoder.save_pretrained(tmp, state_dict=state)
            self.tokenizer.save_pretrained(tmp)
            meta = {
                "format": _FORMAT,
                "pooling": self.pooling,
                "normalize": self.normalize,
                "query_max_len": self.query_max_len,
                "passage_max_len": self.passage_max_len,
                "moe": self.moe_spec.to_dict() if self.moe_spec else None,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    # ---------------------------------------------------------------- compute

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        with token_mask(self.encoder, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def tokenize(self, texts: Sequence[str], max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length or self.passage_max_len,
            return_tensors="pt", return_token_type_ids=False,
        )
        return dict(enc)

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        max_length: Optional[int] = None,
        show_progress: bool = False,
        desc: str = "encode",
    ) -> torch.Tensor:
        """Embed ``texts`` in eval mode without gradients; returns float32 ``[N, D]`` on the CPU.

        Texts are processed longest-first so each batch pads little, then put back in order.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a list of strings")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        try:
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            out = torch.empty(len(texts), self.dim, dtype=torch.float32)
            batches: Iterable[int] = range(0, len(texts), batch_size)
            if show_progress:
                from tqdm.auto import tqdm

                batches = tqdm(batches, desc=desc, unit="batch", total=(len(texts) + batch_size - 1) // batch_size)
            for start in batches:
                idx = order[start : start + batch_size]
                enc = self.tokenize([texts[i] for i in idx], max_length)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                out[idx] = self(**enc).float().cpu()
            return out
        finally:
            self.train(was_training)

    def moe_layer_names(self) -> list[str]:
        return [name for name, _ in moe_layers(self.encoder)]


def _load_weights_strict(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied/persistent buffers HF does not save (position_ids) may be missing; real weights may not.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def num_encoder_layers(model_cfg) -> int:
    """The layer count of the encoder a ``model`` config names, read from its config alone (no
    weights): ``tiny`` from its settings, a folder or hub id from ``config.json``."""
    from clp_ray.errors import ClpRayError

    if model_cfg.name_or_path == "tiny":
        return model_cfg.tiny.num_layers
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(model_cfg.name_or_path).num_hidden_layers)
    except (OSError, ValueError, AttributeError) as e:
        raise ClpRayError(f"cannot read the layer count of {model_cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None


def _read_meta(path: str | os.PathLike) -> dict:
    """A saved folder's ``clp_ray.json`` ({} for a hub id or a plain Hugging Face folder)."""
    meta_file = Path(path) / META_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def is_moe_folder(name_or_path: str | os.PathLike) -> bool:
    """Whether a folder holds a model saved with its MoE layers (``load_embedder`` keeps them as saved)."""
    return bool(_read_meta(name_or_path).get("moe"))


def load_embedder(model_cfg, moe_cfg=None) -> Embedder:
    """Build the Embedder a config describes: ``tiny`` or a hub id / folder, upcycled per ``moe_cfg``
    when it is enabled and the loaded model is not already an MoE model."""
    from clp_ray.tiny import tiny_model_path

    source = tiny_model_path(model_cfg.tiny) if model_cfg.name_or_path == "tiny" else model_cfg.name_or_path
    emb = Embedder.from_pretrained(
        source, pooling=model_cfg.pooling, normalize=model_cfg.normalize,
        query_max_len=model_cfg.query_max_len, passage_max_len=model_cfg.passage_max_len,
    )
    if moe_cfg is not None and moe_cfg.enabled and emb.moe_spec is None:
        r = moe_cfg.router
        emb.upcycle(moe_cfg.layers, moe_cfg.site, moe_cfg.num_experts, moe_cfg.top_k,
                    balance_coef=r.balance_coef, z_coef=r.z_coef, jitter=r.jitter, top1_gate=r.top1_gate)
    return emb


def absolute_model_ref(ref: str) -> str:
    """``ref`` as any process can read it: a local model folder becomes an absolute path; ``tiny``,
    hub ids and ``models:/``/``runs:/`` URIs are returned as given.

    Ray workers and actors run in another working directory, where a relative folder is not found
    and transformers takes its name for a hub id (a network error a minute into the job). A name
    that starts with ``.``, ``/`` or ``~`` is always a folder; any other name is one if it exists.
    """
    from clp_ray.errors import ClpRayError

    if ref == "tiny" or ref.startswith(("models:/", "runs:/")):
        return ref
    path = Path(ref).expanduser()
    if not (ref.startswith((".", "/", "~")) or path.is_dir()):
        return ref  # a hub id
    if not path.is_dir():
        raise ClpRayError(f"model folder {ref} not found")
    if not (path / "config.json").is_file():
        raise ClpRayError(f"{ref} is not a model folder: it has no config.json")
    return str(path.resolve())


def load_model_ref(ref: str, model_cfg=None, *, tracking_uri: Optional[str] = None) -> Embedder:
    """Load what a user names with ``--model``: ``tiny``, a local folder (MoE folders included), a
    hub id, or an MLflow registry URI ``models:/<name>@<alias>`` / ``models:/<name>/<version>``.
    Failures become one clear :class:`~clp_ray.errors.ClpRayError`."""
    from clp_ray.errors import ClpRayError
    from clp_ray.tiny import tiny_model_path

    if ref.startswith("models:/") or ref.startswith("runs:/"):
        from clp_ray.tracking import load_registered_embedder

        return load_registered_embedder(ref, tracking_uri)
    if ref == "tiny":
        from clp_ray.config import ModelConfig

        source: str | Path = tiny_model_path((model_cfg or ModelConfig()).tiny)
    else:
        source = absolute_model_ref(ref)
    try:
        return Embedder.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClpRayError(f"cannot load model {ref!r}: {first}") from None
