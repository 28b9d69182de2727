"""The frozen-prefix cache: train and evaluate only the top of an encoder whose bottom is frozen.

In the paper's setting (``moe.train_only: moe``, the last layer upcycled) nothing below the
upcycled layer trains, yet every step, epoch, trial and dev evaluation would run every text
through the whole frozen stack again. :class:`FrozenPrefix` computes the hidden states *entering*
the lowest trainable layer ``k`` — the embeddings and layers ``0..k-1`` — once per token sequence
and keeps them; the encoder call then runs layers ``k..L-1`` only.

- **What is cached**: per token-id sequence (unpadded; the ids already carry the kind's prefix and
  max length), the ``[length, hidden]`` float32 states. Padding positions are zeros: attention
  masks them out and pooling ignores them, so the real tokens' outputs are exactly those of the
  full encoder.
- **Dropout in the prefix is off**: the prefix always runs in eval mode, as a feature extractor
  (its weights' own precision, never under autocast, no gradient); the trainable top keeps its dropout.
- **Where**: in memory, and with a ``directory`` in safetensors shards under
  ``<directory>/<namespace>/`` (memory-mapped when read), the namespace being a hash of the prefix's
  weights, its class and ``k``. Every process that loads the same frozen weights shares the
  entries: the trials of a sweep, the arms and seeds of an ablation, the ranks of one run (after
  :meth:`FrozenPrefix.sync`), the driver's base/test evaluations. New entries are written by
  :meth:`flush` (atomic, one shard per flush; concurrent writers never collide) and another
  process's shards are picked up by :meth:`refresh`.
- **Where it applies** (:func:`split_layer`): every parameter of the embeddings and of the layers
  below ``k`` is frozen and ``k >= 1``. A call that would need the prefix's gradient, or
  left-padded input, is refused (the former) or run uncached (the latter).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clp_ray.errors import ClpRayError, ConfigError
from clp_ray.model.moe import effective_train_only, find_encoder_layers, normalize_layer_indices
from clp_ray.util.atomic import write_json
from clp_ray.util.cache import cache_root
from clp_ray.util.storage import is_uri

log = logging.getLogger(__name__)

FLUSH_BYTES = 256 << 20  # pending entries beyond this are written out (bounded memory)


@dataclass
class PrefixStats:
    computed: int = 0  # sequences run through the frozen prefix (cache misses)
    hits: int = 0  # sequences whose prefix came from the cache
    flushed: int = 0  # entries written to shards by this process


def _parts(encoder: nn.Module) -> Optional[tuple[nn.Module, nn.ModuleList]]:
    emb, layers = getattr(encoder, "embeddings", None), getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(emb, nn.Module) or not isinstance(layers, nn.ModuleList):
        return None
    return emb, layers


def split_layer(encoder: nn.Module) -> Optional[int]:
    """``k``, the lowest encoder layer with a trainable parameter (the layer count when none
    trains), when the embeddings and every layer below ``k`` are frozen and ``k >= 1``; else None
    (nothing to cache, or an encoder that is not BERT-shaped: embeddings + ``encoder.layer``)."""
    parts = _parts(encoder)
    if parts is None:
        return None
    emb, layers = parts
    known = {id(p) for p in emb.parameters()} | {id(p) for p in layers.parameters()}
    if any(id(p) not in known for p in encoder.parameters()) or any(p.requires_grad for p in emb.parameters()):
        return None
    k = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), len(layers))
    return k if k >= 1 else None


def prefix_hash(encoder: nn.Module, k: int) -> str:
    """The namespace of ``encoder``'s prefix below layer ``k``: its class, ``k`` and its weights."""
    emb, layers = _parts(encoder)
    h = hashlib.blake2b(f"{type(encoder).__name__}:{k}".encode(), digest_size=12)
    for module in (emb, *layers[:k]):
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _key(ids: torch.Tensor) -> str:
    return hashlib.blake2b(ids.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).hexdigest()


class FrozenPrefix:
    """``last_hidden_state(input_ids, attention_mask)`` of ``encoder`` with its frozen prefix below
    layer ``k`` taken from the cache (see the module docstring)."""

    def __init__(self, encoder: nn.Module, k: int, directory: Optional[str | os.PathLike] = None):
        parts = _parts(encoder)
        if parts is None:
            raise ValueError(f"{type(encoder).__name__} is not BERT-shaped (embeddings + encoder.layer)")
        self.encoder, (self.embeddings, self.layers), self.k = encoder, parts, k
        self.namespace = prefix_hash(encoder, k)
        self.dir = Path(directory) / self.namespace if directory is not None else None
        self.stats = PrefixStats()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._index: dict[str, int] = {}  # key -> shard
        self._shards: list = []
        self._opened: set[str] = set()
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if not (self.dir / "info.json").exists():
                    write_json(self.dir / "info.json", {"encoder": type(encoder).__name__, "layer": k,
                                                        "layers": len(self.layers), "hidden": self._hidden_size()})
            except OSError as e:  # an unwritable folder costs the sharing, never the run
                log.warning("frozen-prefix cache: cannot use %s (%s); keeping it in memory", self.dir, e)
                self.dir = None
            self.refresh()

    def _hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def describe(self) -> str:
        where = f"at {self.dir}" if self.dir else "in memory"
        top = (f"each step runs layers {self.k}-{len(self.layers) - 1}" if self.k < len(self.layers)
               else "no encoder layer trains")
        return (f"frozen-prefix cache: embeddings + layers 0-{self.k - 1} of {len(self.layers)} cached {where} "
                f"({len(self)} sequences); {top}")

    # ------------------------------------------------------------------ store

    def refresh(self) -> int:
        """Open the shards other processes wrote since the last call; returns how many."""
        if self.dir is None:
            return 0
        new = 0
        for path in sorted(self.dir.glob("*.safetensors")):
            if path.name in self._opened:
                continue
            try:
                shard = safe_open(str(path), framework="pt")
            except Exception as e:  # a damaged shard costs its entries (recomputed), never the run
                log.warning("frozen-prefix cache: skipping unreadable shard %s: %s", path, e)
                self._opened.add(path.name)
                continue
            self._opened.add(path.name)
            self._shards.append(shard)
            for key in shard.keys():
                self._index.setdefault(key, len(self._shards) - 1)
            new += 1
        return new

    def flush(self) -> int:
        """Write the entries computed since the last flush into one new shard (atomic); returns how
        many. Without a directory, entries stay in memory."""
        if self.dir is None or not self._pending:
            return 0
        name = f"{uuid.uuid4().hex}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        try:
            save_file(self._pending, str(tmp), metadata={"namespace": self.namespace})
            os.replace(tmp, self.dir / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("frozen-prefix cache: cannot write %s (%s); keeping %d entries in memory", self.dir, e,
                        len(self._pending))
            return 0
        n = len(self._pending)
        self._pending, self._pending_bytes = {}, 0
        self.stats.flushed += n
        self.refresh()
        return n

    def sync(self) -> None:
        """Share this process's new entries with the other ranks of a run: flush, barrier, refresh."""
        self.flush()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.refresh()

    def _get(self, key: str) -> Optional[torch.Tensor]:
        t = self._pending.get(key)
        if t is None and key in self._index:
            t = self._shards[self._index[key]].get_tensor(key)
        return t

    def _put(self, key: str, t: torch.Tensor) -> None:
        self._pending[key] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes > FLUSH_BYTES:
            self.flush()

    # ------------------------------------------------------------------ compute

    def _check_frozen(self) -> None:
        if torch.is_grad_enabled() and any(p.requires_grad for m in (self.embeddings, *self.layers[:self.k])
                                           for p in m.parameters()):
            raise ClpRayError("frozen-prefix cache: a parameter below layer "
                              f"{self.k} trains now; the cache only serves a frozen prefix (train.prefix_cache: false)")

    @torch.no_grad()
    def _run_prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        modules = (self.embeddings, *self.layers[:self.k])
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.autocast(ids.device.type, enabled=False):
                hidden = self.embeddings(input_ids=ids)
                return self.run_layers(hidden, mask, 0, self.k)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers ``start..stop-1`` over ``hidden``, with the attention mask the encoder builds itself."""
        from transformers.masking_utils import create_bidirectional_mask

        attn = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, attn)
        return hidden

    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """``[B, T, H]`` states entering layer ``k`` (zeros at padding); None for left-padded input."""
        lengths = attention_mask.sum(1)
        width = input_ids.shape[1]
        positions = torch.arange(width, device=attention_mask.device)
        if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
            return None
        lengths = lengths.tolist()
        keys = [_key(input_ids[i, :n]) for i, n in enumerate(lengths)]
        rows = [self._get(key) for key in keys]
        first = {}  # key -> the first row missing it: a sequence twice in one batch is computed once
        for i, r in enumerate(rows):
            if r is None:
                first.setdefault(keys[i], i)
        self.stats.hits += len(rows) - len(first)
        if first:
            self._compute(input_ids, attention_mask, lengths, keys, list(first.values()), rows)
        out = torch.zeros(len(rows), width, self._hidden_size(), dtype=torch.float32)
        for i, r in enumerate(rows):
            out[i, :lengths[i]] = r if r is not None else rows[first[keys[i]]]
        return out.to(input_ids.device)

    def _compute(self, input_ids, attention_mask, lengths, keys, todo, rows) -> None:
        idx = torch.as_tensor(todo, device=input_ids.device)
        w = max(max(lengths[i] for i in todo), 1)
        states = self._run_prefix(input_ids[idx, :w], attention_mask[idx, :w]).float().cpu()
        self.stats.computed += len(todo)
        for j, i in enumerate(todo):
            rows[i] = states[j, :lengths[i]].clone()
            self._put(keys[i], rows[i])

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """The encoder's ``last_hidden_state``, the prefix from the cache; None when the cache
        cannot serve this input (left padding): the caller runs the whole encoder."""
        self._check_frozen()
        states = self.prefix_states(input_ids, attention_mask)
        if states is None:
            return None
        dtype = next(self.layers[self.k].parameters()).dtype if self.k < len(self.layers) else states.dtype
        return self.run_layers(states.to(dtype), attention_mask, self.k, len(self.layers))


def prefix_cache_dir(cfg) -> Optional[str]:
    """The frozen-prefix cache's folder, absolute (workers and trials may run elsewhere); None when
    ``train.prefix_cache`` is off."""
    t = cfg.train
    if not t.prefix_cache:
        return None
    if t.prefix_cache_dir:
        if is_uri(t.prefix_cache_dir):  # memory-mapped shards: a local (or network-mounted) folder
            raise ConfigError(f"{cfg.cite('train.prefix_cache_dir')}: must be a local folder, got {t.prefix_cache_dir!r}")
        return str(Path(t.prefix_cache_dir).expanduser().resolve())
    if is_uri(t.output_dir):
        return str(cache_root() / "prefix")
    return str(Path(t.output_dir).expanduser().resolve() / "prefix_cache")


def trained_from(cfg, num_layers: int) -> Optional[int]:
    """The lowest layer a training run with ``cfg`` trains, when its policy leaves a prefix frozen
    (``moe.train_only`` ``moe``/``site``; with MoE off, ``moe`` trains everything): for the
    driver's evaluations of an untrained or trained model, which share the workers' cache."""
    if effective_train_only(cfg.moe) not in ("moe", "site") or not cfg.train.prefix_cache:
        return None
    k = min(normalize_layer_indices(list(cfg.moe.layers), num_layers))
    return k if k >= 1 else None


def attach(embedder, directory: Optional[str | os.PathLike], k: Optional[int] = None) -> Optional[FrozenPrefix]:
    """Give ``embedder`` a :class:`FrozenPrefix` below layer ``k`` (default: where its trainable
    parameters leave a frozen prefix, :func:`split_layer`); returns it, or None (logged) when
    nothing would be saved. A given ``k`` serves inference only (encode, evaluation)."""
    k = split_layer(embedder.encoder) if k is None else k
    if k is None:
        log.info("frozen-prefix cache: not used (the embeddings or the first layer train)")
        embedder.frozen_prefix = None
        return None
    embedder.frozen_prefix = FrozenPrefix(embedder.encoder, k, directory)
    log.info("%s", embedder.frozen_prefix.describe())
    return embedder.frozen_prefix


def for_inference(embedder, cfg) -> Optional[FrozenPrefix]:
    """Attach the cache a training run with ``cfg`` shares to a model the driver evaluates (the
    untrained base, a trained trial, the champion): its prefix below the layer that run trains
    from. A model whose prefix weights differ gets a namespace of its own (never wrong entries)."""
    directory = prefix_cache_dir(cfg)
    k = trained_from(cfg, len(find_encoder_layers(embedder.encoder))) if directory else None
    return attach(embedder, directory, k) if k is not None and _parts(embedder.encoder) is not None else None
