"""Embedder: a Hugging Face encoder + pooling + L2 normalisation, with MoE-aware save/load.

A saved folder is a normal Hugging Face model folder (``config.json``, weights, tokenizer) plus
BGE-M3's ``sparse_linear.pt`` / ``colbert_linear.pt`` when the model has them (:mod:`clp_ray.model.m3`:
the sparse and multi-vector modes, ``encode(..., output=...)``) and ``clp_ray.json`` (the :class:`~clp_ray.model.settings.EmbedSettings` — pooling, normalisation, max
lengths, query/passage prefixes — and the :class:`~clp_ray.model.moe.MoESpec` of its MoE layers, derived
from the modules themselves). ``Embedder.from_pretrained`` resolves the settings in one order
(explicit > what the folder says > defaults, see :mod:`clp_ray.model.settings`), rebuilds the MoE
layers and loads every encoder weight strictly: a missing or unexpected weight is an error naming
it, never a silently random layer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from clp_ray.errors import ClpRayError
from clp_ray.model.folder import check_max_lengths, check_model_folder
from clp_ray.model.m3 import Encoding, M3Heads, ModeOutput, check_modes, load_heads, save_heads, sparse_vectors, unused_token_ids
from clp_ray.model.moe import MoESpec, apply_spec, moe_spec_of, token_mask, upcycle
from clp_ray.model.settings import KINDS, META_FILE, SETTING_KEYS, ST_FILES, EmbedSettings, read_meta, resolve
from clp_ray.model.st_files import write_sentence_transformers_files
from clp_ray.util.atomic import atomic_path
from clp_ray.util.unicode_text import SURROGATE, first_invalid

log = logging.getLogger(__name__)

_FORMAT = 2
# Weights a checkpoint may carry beside the encoder's (task heads, the pooler we do not build).
_HEAD_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.")


class Embedder(nn.Module):
    """Text embedding model. ``forward`` takes tokenized inputs and returns ``[B, D]`` embeddings;
    ``encode`` takes strings (``kind="query"``/``"passage"`` adds that prefix and max length)."""

    def __init__(self, encoder: nn.Module, tokenizer, settings: Optional[EmbedSettings] = None, *,
                 heads: Optional[M3Heads] = None, **fields):
        """``settings`` (default :class:`EmbedSettings`'s), with any of its fields given by name
        (``pooling="mean"``) replacing the value there. ``emb.pooling`` etc. read and set it."""
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.settings = replace(settings or EmbedSettings(), **fields)
        self.heads = heads  # BGE-M3's sparse and ColBERT heads, None for a dense-only model
        self.settings_sources: dict[str, str] = {}  # setting -> where its value came from (from_pretrained)
        # The frozen-prefix cache (clp_ray.model.prefix_cache.attach): None runs the whole encoder.
        self.frozen_prefix = None

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides) -> Embedder:
        """Load a hub id or a local folder (including folders written by :meth:`save_pretrained`).

        ``overrides`` (any :class:`~clp_ray.model.settings.EmbedSettings` field) win over what the
        folder says, which wins over the defaults.
        """
        if Path(name_or_path).is_dir():
            check_model_folder(name_or_path)  # loads fully or not at all: tokenizer, config, weight shapes
        resolved = resolve(settings_folder(name_or_path), overrides)
        tokenizer = load_tokenizer(str(name_or_path))
        encoder = load_encoder(str(name_or_path))
        check_max_lengths(resolved.settings, resolved.sources, encoder.config, str(name_or_path))
        heads = load_heads(name_or_path, int(encoder.config.hidden_size))
        emb = cls(encoder, tokenizer, resolved.settings, heads=heads)
        emb.settings_sources = resolved.sources
        log.info("loaded %s: %s; modes %s", name_or_path, resolved.describe(), "/".join(emb.modes))
        # Eval mode, as transformers' from_pretrained leaves a model (the MoE branch builds the
        # encoder from its config, which starts in training mode with dropout on).
        return emb.eval()

    @property
    def modes(self) -> tuple[str, ...]:
        """The retrieval modes this model has: dense, plus sparse and colbert with BGE-M3's heads."""
        return ("dense", "sparse", "colbert") if self.heads is not None else ("dense",)

    @property
    def moe_spec(self) -> Optional[MoESpec]:
        """The MoE layout of the encoder as it is now (however it was upcycled); None if dense."""
        return moe_spec_of(self.encoder)

    def upcycle(self, layers: Sequence[int], site: str = "intermediate", num_experts: int = 2, top_k: int = 1, **router) -> MoESpec:
        """Upcycle encoder layers into MoE (see :func:`clp_ray.model.moe.upcycle`)."""
        if self.moe_spec is not None:
            raise ValueError(f"this Embedder is already upcycled ({self.moe_spec})")
        return upcycle(self.encoder, list(layers), site, num_experts, top_k, **router)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write a folder that :meth:`from_pretrained` restores exactly; atomic (temp + rename).
        The MoE layout is read from the modules, so a model upcycled with the module-level
        :func:`clp_ray.model.moe.upcycle` saves its experts and routers too. sentence-transformers' own
        files are written as well (:mod:`clp_ray.model.st_files`): ``SentenceTransformer(folder)`` gives
        the same embeddings (``trust_remote_code=True`` for an MoE folder)."""
        out = Path(out_dir)
        spec = self.moe_spec
        with atomic_path(out, is_dir=True) as tmp:
            state = {k: v.detach().contiguous() for k, v in self.encoder.state_dict().items()}
            self.encoder.save_pretrained(tmp, state_dict=state)
            self.tokenizer.save_pretrained(tmp)
            meta = {"format": _FORMAT, **self.settings.to_dict(), "moe": spec.to_dict() if spec else None}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            write_sentence_transformers_files(tmp, self.settings, self.dim, moe=spec is not None, versions=_versions())
            if self.heads is not None:
                save_heads(self.heads, tmp)
        return out

    # ---------------------------------------------------------------- compute

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modes: Optional[Sequence[str]] = None,
                **kwargs) -> torch.Tensor | ModeOutput:
        """``[B, D]`` dense embeddings; with ``modes`` (a subset of :attr:`modes`) a
        :class:`~clp_ray.model.m3.ModeOutput` holding each of them (see :mod:`clp_ray.model.m3`)."""
        with token_mask(self.encoder, attention_mask):
            hidden = None
            if self.frozen_prefix is not None and not kwargs:
                hidden = self.frozen_prefix.last_hidden_state(input_ids, attention_mask)
            if hidden is None:
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if modes is None:
            return self._pool(hidden, attention_mask)
        out = ModeOutput(dense=self._pool(hidden, attention_mask) if "dense" in modes else None)
        if "sparse" in modes:
            out.sparse = sparse_vectors(self.heads.token_weights(hidden), input_ids, attention_mask,
                                        int(self.encoder.config.vocab_size), unused_token_ids(self.tokenizer))
        if "colbert" in modes:
            out.colbert = self.heads.token_vectors(hidden, attention_mask, self.normalize)
            out.colbert_mask = attention_mask[:, 1:]
        return out

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(hidden.device.type):  # pooled and normalised in fp32 under bf16 autocast
            hidden = hidden.float()
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def prefixed(self, texts: Sequence[str], kind: Optional[str]) -> list[str]:
        """``texts`` with the prefix (instruction) of ``kind`` (``query``/``passage``; None: none)."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        prefix = self.settings.prefix(kind)
        return [prefix + t for t in texts] if prefix else list(texts)

    def tokenize(self, texts: Sequence[str], max_length: Optional[int] = None, kind: Optional[str] = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            self.prefixed(texts, kind), padding=True, truncation=True,
            max_length=max_length or self.settings.max_len(kind), return_tensors="pt", return_token_type_ids=False,
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
        kind: Optional[str] = None,
        output: str | Sequence[str] = "dense",
    ):
        """Embed ``texts`` in eval mode without gradients; everything returned is float32 on the CPU.

        ``output="dense"`` (default): ``[N, D]`` embeddings. ``"sparse"``: per text ``{token id:
        weight}`` (BGE-M3's lexical weights); ``"colbert"``: per text a ``[tokens, D']`` tensor (one
        normalised vector per token after CLS). A sequence of modes returns a
        :class:`~clp_ray.model.m3.Encoding` holding each. Sparse and ColBERT need BGE-M3's heads
        (:attr:`modes`).

        ``kind="query"`` / ``"passage"`` prepends that prefix and truncates at that max length
        (``max_length`` overrides it); None adds no prefix and uses the passage length.
        Texts are processed longest-first so each batch pads little, then put back in order.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a list of strings")
        bad = first_invalid(texts)
        if bad is not None:
            raise ValueError(f"encode expects text: item {bad} {SURROGATE}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        modes = check_modes([output] if isinstance(output, str) else output, self.heads is not None)
        was_training = self.training
        self.eval()
        try:
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            result = Encoding.empty(len(texts), self.dim, modes)
            batches: Iterable[int] = range(0, len(texts), batch_size)
            if show_progress:
                batches = tqdm(batches, desc=desc, unit="batch", total=(len(texts) + batch_size - 1) // batch_size)
            for start in batches:
                idx = order[start : start + batch_size]
                enc = self.tokenize([texts[i] for i in idx], max_length, kind)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                if modes == ("dense",):
                    result.dense[idx] = self(**enc).float().cpu()
                else:
                    result.put(idx, self(**enc, modes=modes))
            if self.frozen_prefix is not None:  # what this call computed outlives the process (other trials)
                self.frozen_prefix.flush()
            return getattr(result, output) if isinstance(output, str) else result
        finally:
            self.train(was_training)


# --------------------------------------------------------------------------------------------
# Loading.



def _setting(name: str) -> property:
    def get(self: Embedder):
        return getattr(self.settings, name)

    def set_(self: Embedder, value) -> None:
        self.settings = replace(self.settings, **{name: value})

    return property(get, set_, doc=f"``settings.{name}`` (setting it replaces the settings object)")


for _name in SETTING_KEYS:  # emb.pooling, emb.query_prefix, ...: views of the one EmbedSettings
    setattr(Embedder, _name, _setting(_name))


def settings_folder(name_or_path: str | os.PathLike) -> Optional[Path]:
    """A local folder holding the model's settings files: the folder itself, or for a hub id the
    cached snapshot of its small JSON files (None when the hub has nothing to say)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=[META_FILE, *ST_FILES, "*/config.json"]))
    except Exception as e:  # offline, unknown repo, auth: transformers' own load reports the real problem
        log.debug("no settings files for %s: %s", name_or_path, e)
        return None


def load_tokenizer(source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as e:  # a broken tokenizer file, an unknown class
        raise ClpRayError(f"{source}: cannot load its tokenizer: {str(e).strip().splitlines()[0][:300]}") from None


def load_encoder(source: str) -> nn.Module:
    """The encoder of a folder or hub id, every weight loaded or the load fails naming them."""
    moe = read_meta(source).get("moe") if Path(source).is_dir() else None
    if moe:
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(source), add_pooling_layer=False)
        apply_spec(encoder, MoESpec(**moe))
        _load_weights_strict(encoder, Path(source))
        return encoder
    encoder, info = AutoModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.startswith(_HEAD_PREFIXES)]
    mismatched = [str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or []]
    _fail_on_weight_problems(source, missing, unexpected, mismatched)
    return encoder


def _versions() -> dict:
    """What wrote the folder (sentence-transformers' ``__version__`` entry)."""
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        ours = version("clp-ray")
    except PackageNotFoundError:  # run from a source tree that is not installed
        ours = "unknown"
    return {"clp_ray": ours, "transformers": transformers.__version__, "pytorch": torch.__version__}


def _fail_on_weight_problems(source, missing, unexpected, mismatched=()) -> None:
    # Persistent buffers HF does not save (position_ids) may be missing; real weights may not.
    missing = sorted(k for k in missing if not k.endswith("position_ids"))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", sorted(unexpected)), ("shape-mismatched", mismatched)):
        if keys:
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    hint = ""
    if any(".experts." in k or ".router." in k for k in unexpected):
        hint = f"; the weights hold MoE layers but {META_FILE} describes none"
    raise ClpRayError(f"{source}: encoder weights do not match the model: {'; '.join(parts)}{hint} "
                      "(refusing to initialise them at random)")


def _load_weights_strict(model: nn.Module, folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ClpRayError(f"{folder}: no *.safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    _fail_on_weight_problems(folder, missing, [k for k in unexpected if not k.startswith(_HEAD_PREFIXES)])


