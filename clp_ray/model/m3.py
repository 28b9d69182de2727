"""BGE-M3's sparse and multi-vector heads, and the three retrieval modes they make.

BGE-M3 is one encoder with three ways to score a (query, passage) pair, all from the last hidden
states ``h`` ``[B, L, H]``:

- **dense**: the pooled (CLS) vector, L2-normalised; score = inner product.
- **sparse** (lexical weights): ``w = ReLU(sparse_linear(h))`` ``[B, L]``, one weight per token;
  per text, the largest weight of each token id, the special tokens (CLS, EOS, PAD, UNK) dropped.
  Score = sum over the token ids both texts have of the product of their weights.
- **colbert** (multi-vector): ``colbert_linear(h[:, 1:])`` (the CLS position dropped), each token
  vector L2-normalised; score = mean over the query's tokens of the best inner product with any
  passage token (MaxSim).

The hub folder ``BAAI/bge-m3`` stores the two heads beside the encoder as ``sparse_linear.pt``
(``Linear(H, 1)``) and ``colbert_linear.pt`` (``Linear(H, H)``), state dicts with ``weight`` and
``bias``; :func:`load_heads` / :func:`save_heads` read and write that layout. Heads that were not
changed are written back byte for byte as they were read (a bf16 training copy does not round
them). Everything here is computed the way FlagEmbedding's ``M3Embedder`` computes it
(``tests/test_m3.py`` checks it against FlagEmbedding itself).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clp_ray.errors import ClpRayError

log = logging.getLogger(__name__)

SPARSE_FILE = "sparse_linear.pt"
COLBERT_FILE = "colbert_linear.pt"
HEAD_FILES = (SPARSE_FILE, COLBERT_FILE)
MODES = ("dense", "sparse", "colbert")
HYBRID = "hybrid"
# BGE-M3's weights for s = w_dense·s_dense + w_sparse·s_lex + w_colbert·s_mul (its paper's re-rank
# setting, and the ensemble its unified fine-tuning distils from).
DEFAULT_WEIGHTS = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}
_UNUSED_TOKENS = ("cls_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


class M3Heads(nn.Module):
    """``sparse_linear`` (``Linear(H, 1)``) and ``colbert_linear`` (``Linear(H, D')``), plus the
    files they were loaded from (so that unchanged heads are saved exactly as they came)."""

    def __init__(self, hidden_size: int, colbert_dim: Optional[int] = None):
        super().__init__()
        self.sparse_linear = nn.Linear(hidden_size, 1)
        self.colbert_linear = nn.Linear(hidden_size, colbert_dim or hidden_size)
        self._loaded: dict[str, tuple[bytes, dict[str, torch.Tensor]]] = {}  # file -> (bytes, state)

    @property
    def colbert_dim(self) -> int:
        return int(self.colbert_linear.out_features)

    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ReLU lexical weight of every token position."""
        return torch.relu(self.sparse_linear(hidden)).squeeze(-1)

    def token_vectors(self, hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool) -> torch.Tensor:
        """``[B, L-1, D']`` ColBERT vectors of every position but the first (CLS); zero at padding."""
        vecs = self.colbert_linear(hidden[:, 1:]) * attention_mask[:, 1:, None].to(hidden.dtype)
        return F.normalize(vecs, dim=-1) if normalize else vecs

    def unchanged(self, file: str) -> bool:
        """Whether the head saved as ``file`` still holds what was loaded from it (up to a dtype
        cast of the whole model, e.g. to bf16 for training)."""
        if file not in self._loaded:
            return False
        module = self.sparse_linear if file == SPARSE_FILE else self.colbert_linear
        state = module.state_dict()
        loaded = self._loaded[file][1]
        return state.keys() == loaded.keys() and all(
            torch.equal(state[k].detach().cpu(), loaded[k].to(state[k].dtype)) for k in state)


@dataclass
class ModeOutput:
    """What one encoder call gives for the modes asked: ``dense`` ``[B, D]``; ``sparse`` ``[B, V]``
    (one weight per vocabulary id, zero for ids the text lacks); ``colbert`` ``[B, L-1, D']`` with
    ``colbert_mask`` ``[B, L-1]`` (1 at real tokens)."""

    dense: Optional[torch.Tensor] = None
    sparse: Optional[torch.Tensor] = None
    colbert: Optional[torch.Tensor] = None
    colbert_mask: Optional[torch.Tensor] = None

    def index_select(self, index: torch.Tensor) -> ModeOutput:
        def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, index)

        return ModeOutput(pick(self.dense), pick(self.sparse), pick(self.colbert), pick(self.colbert_mask))

    def float(self) -> ModeOutput:
        """The float outputs in fp32 (a loss under bf16 autocast); the mask as it is."""
        def up(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None or not t.is_floating_point() else t.float()

        return ModeOutput(up(self.dense), up(self.sparse), up(self.colbert), self.colbert_mask)


@dataclass
class Encoding:
    """What :meth:`Embedder.encode` returns for several modes: ``dense`` ``[N, D]``; ``sparse``,
    per text, ``{token id: weight}``; ``colbert``, per text, a ``[tokens, D']`` tensor. A mode not
    asked for is None."""

    dense: Optional[torch.Tensor] = None
    sparse: Optional[list[dict[int, float]]] = None
    colbert: Optional[list[torch.Tensor]] = None

    @classmethod
    def empty(cls, n: int, dim: int, modes: Sequence[str]) -> Encoding:
        return cls(dense=torch.empty(n, dim, dtype=torch.float32) if "dense" in modes else None,
                   sparse=[{} for _ in range(n)] if "sparse" in modes else None,
                   colbert=[torch.empty(0)] * n if "colbert" in modes else None)

    def put(self, rows: Sequence[int], out: ModeOutput) -> None:
        """Store one batch's :class:`ModeOutput` at ``rows``."""
        if self.dense is not None:
            self.dense[list(rows)] = out.dense.float().cpu()
        if self.sparse is not None:
            for r, weights in zip(rows, lexical_weights(out.sparse)):
                self.sparse[r] = weights
        if self.colbert is not None:
            vecs, mask = out.colbert.float().cpu(), out.colbert_mask.bool().cpu()
            for i, r in enumerate(rows):
                self.colbert[r] = vecs[i][mask[i]].clone()


def cat_outputs(parts: Sequence[ModeOutput]) -> ModeOutput:
    """Row-wise concatenation; ColBERT vectors of parts of different lengths are zero-padded."""
    if len(parts) == 1:
        return parts[0]
    out = ModeOutput()
    for name in ("dense", "sparse"):
        if getattr(parts[0], name) is not None:
            setattr(out, name, torch.cat([getattr(p, name) for p in parts]))
    if parts[0].colbert is not None:
        width = max(p.colbert.shape[1] for p in parts)
        out.colbert = torch.cat([F.pad(p.colbert, (0, 0, 0, width - p.colbert.shape[1])) for p in parts])
        out.colbert_mask = torch.cat([F.pad(p.colbert_mask, (0, width - p.colbert_mask.shape[1])) for p in parts])
    return out


def unused_token_ids(tokenizer) -> list[int]:
    """The ids BGE-M3 gives no lexical weight: CLS, EOS, PAD and UNK (those the tokenizer has)."""
    return sorted({i for i in (getattr(tokenizer, a, None) for a in _UNUSED_TOKENS) if i is not None})


def sparse_vectors(weights: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   vocab_size: int, unused_ids: Sequence[int]) -> torch.Tensor:
    """``[B, V]``: per text and token id, the largest weight of that id (0 where it does not occur).

    Special ids and padding get weight 0 *before* the max, out of place, so the result is
    differentiable (FlagEmbedding zeroes the special columns afterwards, in place; with weights
    >= 0 the two are equal)."""
    keep = attention_mask.bool()
    if unused_ids:
        keep = keep & ~torch.isin(input_ids, torch.tensor(list(unused_ids), device=input_ids.device))
    weights = weights * keep.to(weights.dtype)
    out = weights.new_zeros(weights.shape[0], vocab_size)
    return out.scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True)


def lexical_weights(sparse: torch.Tensor) -> list[dict[int, float]]:
    """``{token id: weight}`` per row of :func:`sparse_vectors` (its non-zero entries)."""
    rows = []
    for row in sparse.float().cpu():
        ids = row.nonzero().squeeze(-1)
        rows.append(dict(zip(ids.tolist(), row[ids].tolist())))
    return rows


def lexical_json(rows: Sequence[dict[int, float]]) -> list[dict[str, float]]:
    """Lexical weights as JSON carries them (FlagEmbedding's ``lexical_weights`` layout): object
    keys are strings, so token ids become ``"123"``."""
    return [{str(t): w for t, w in row.items()} for row in rows]


def sparse_scores(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[Bq, Bp]`` lexical matching scores of :func:`sparse_vectors` rows."""
    return q.float() @ p.float().T


def colbert_scores(q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """``[Bq, Bp]`` MaxSim: per query token the best inner product over the passage's real tokens,
    averaged over the query's real tokens."""
    q, p = q.float(), p.float()
    tok = torch.einsum("qid,pjd->qpij", q, p)
    tok = tok.masked_fill(~p_mask.bool()[None, :, None, :], torch.finfo(tok.dtype).min)
    best = tok.max(-1).values * q_mask.to(tok.dtype)[:, None, :]
    return best.sum(-1) / q_mask.to(tok.dtype).sum(-1, keepdim=True).clamp_min(1)


def colbert_pair_scores(q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` MaxSim of row ``i`` of ``q`` with row ``i`` of ``p`` only (the diagonal of
    :func:`colbert_scores`, without the ``N x N`` pairs)."""
    q, p = q.float(), p.float()
    tok = torch.einsum("nid,njd->nij", q, p)
    tok = tok.masked_fill(~p_mask.bool()[:, None, :], torch.finfo(tok.dtype).min)
    best = tok.max(-1).values * q_mask.to(tok.dtype)
    return best.sum(-1) / q_mask.to(tok.dtype).sum(-1).clamp_min(1)


# --------------------------------------------------------------------------------------------
# Files.


def load_heads(source: str | os.PathLike, hidden_size: int) -> Optional[M3Heads]:
    """The heads a local folder or hub id has (None when it has neither file). A folder with only
    one of the two, or a head that does not fit the encoder, is an error naming the file."""
    files = _head_files(source)
    if files is None:
        return None
    states: dict[str, tuple[bytes, dict[str, torch.Tensor]]] = {}
    for name, path in files.items():
        raw = Path(path).read_bytes()
        try:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: pickle's / zipfile's own message
            raise ClpRayError(f"{path}: not a readable PyTorch state dict: {str(e).splitlines()[0]}") from None
        states[name] = (raw, _checked_state(path, state, hidden_size, name))
    heads = M3Heads(hidden_size, int(states[COLBERT_FILE][1]["weight"].shape[0]))
    heads.sparse_linear.load_state_dict(states[SPARSE_FILE][1])
    heads.colbert_linear.load_state_dict(states[COLBERT_FILE][1])
    heads.to(states[COLBERT_FILE][1]["weight"].dtype)
    heads._loaded = states
    return heads


def _checked_state(path, state, hidden_size: int, name: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ClpRayError(f"{path}: expected a Linear state dict with 'weight' and 'bias', got {keys}")
    w, b = state["weight"], state["bias"]
    out = 1 if name == SPARSE_FILE else w.shape[0]
    if w.dim() != 2 or tuple(w.shape) != (out, hidden_size) or tuple(b.shape) != (out,):
        raise ClpRayError(f"{path}: weight {list(w.shape)} / bias {list(b.shape)} do not fit an encoder of hidden "
                          f"size {hidden_size} (expected weight [{out}, {hidden_size}])")
    return state


def _head_files(source: str | os.PathLike) -> Optional[dict[str, str]]:
    path = Path(source)
    if path.is_dir():
        found = {f: str(path / f) for f in HEAD_FILES if (path / f).is_file()}
    else:
        found = _hub_head_files(str(source))
    if not found:
        return None
    if len(found) == 1:
        (have,) = found
        missing = next(f for f in HEAD_FILES if f != have)
        raise ClpRayError(f"{source}: has {have} but not {missing}: BGE-M3's sparse and ColBERT heads are loaded "
                          "together (remove the stray file, or add the missing one)")
    return found


def _hub_head_files(repo_id: str) -> dict[str, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    found = {}
    for f in HEAD_FILES:
        try:
            found[f] = hf_hub_download(repo_id, f)
        except RemoteEntryNotFoundError:  # the repo has no such file: a dense-only model
            continue
        except Exception as e:  # offline and not cached, or unreachable: the encoder may still load from the cache
            log.warning("%s: cannot fetch %s (%s): the model loads without its sparse/ColBERT heads",
                        repo_id, f, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return {}
    return found


def save_heads(heads: M3Heads, folder: str | os.PathLike) -> None:
    """Write both heads in the hub layout; one not changed since loading is copied byte for byte."""
    for name, module in ((SPARSE_FILE, heads.sparse_linear), (COLBERT_FILE, heads.colbert_linear)):
        target = Path(folder) / name
        if heads.unchanged(name):
            target.write_bytes(heads._loaded[name][0])
        else:
            torch.save({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}, target)


def new_heads(hidden_size: int, dtype: torch.dtype = torch.float32) -> M3Heads:
    """Freshly initialised heads (torch's Linear init, from the current RNG), as FlagEmbedding
    starts unified fine-tuning of a model that has none."""
    return M3Heads(hidden_size).to(dtype)


def check_modes(modes: Sequence[str], has_heads: bool, what: str = "this model") -> tuple[str, ...]:
    """``modes`` validated: known names, and sparse/colbert only for a model with the heads."""
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"output must be one or more of {', '.join(MODES)}, got {list(modes)}")
    missing = [m for m in modes if m != "dense" and not has_heads]
    if missing:
        raise ClpRayError(f"{what} has no {'/'.join(missing)} head: only models with BGE-M3's {SPARSE_FILE} and "
                          f"{COLBERT_FILE} (e.g. BAAI/bge-m3) have the sparse and ColBERT modes")
    return modes
