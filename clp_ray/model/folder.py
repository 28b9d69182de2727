"""A local model folder is checked before transformers builds anything from it: it loads fully or
not at all, and every problem is one :class:`~clp_ray.errors.ClpRayError` (exit 2) naming the file.

transformers is lenient where clp-ray must not be: a folder without tokenizer files gets a
tokenizer of five special tokens that maps every word to ``<unk>`` (and the model then "works");
an empty or truncated ``model.safetensors`` or a ``config.json`` whose sizes disagree with the
weights fail with a traceback from deep inside the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clp_ray.errors import ClpRayError

# Any one of these gives a real vocabulary (fast tokenizers, SentencePiece, WordPiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "vocab.txt",
                   "vocab.json")


def check_model_folder(folder: str | Path) -> None:
    """Refuse a folder that transformers would load wrongly or with a traceback."""
    folder = Path(folder)
    config = _read_config(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ClpRayError(f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); transformers would "
                          "build a tokenizer that maps every word to <unk>. Copy the tokenizer of the model it was "
                          "trained from into the folder")
    check_weight_shapes(folder, config)


def _read_config(folder: Path):
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClpRayError(f"{path}: missing (a model folder needs its transformers config)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ClpRayError(f"{path}: unreadable: {e}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ClpRayError(f"{path}: not a transformers config (a JSON object with model_type)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ClpRayError(f"{path}: invalid transformers config: {str(e).strip().splitlines()[0][:300]}") from None


def weight_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor's shape in the folder's ``*.safetensors`` files, read from their headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = (tuple(f.get_slice(key).get_shape()), path)
        except Exception as e:  # SafetensorError, OSError: empty, truncated or garbage header
            raise ClpRayError(f"{path}: not a readable safetensors file ({str(e).strip()[:200]})") from None
    return shapes


def check_weight_shapes(folder: Path, config) -> None:
    """The shapes ``config.json`` implies against the ones the weights have, before any allocation
    (the model is built on the meta device)."""
    from transformers import AutoModel

    shapes = weight_shapes(folder)
    if not shapes:
        return  # *.bin-only folders: transformers' own load checks them
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:  # architectures without a pooling layer
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except (ValueError, RuntimeError) as e:
        raise ClpRayError(f"{folder / 'config.json'}: cannot build the model it describes: {str(e)[:300]}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    wrong = []
    for key, (shape, path) in sorted(shapes.items()):
        name = key.removeprefix(prefix)
        if name in expected and expected[name] != shape:
            wrong.append(f"{key} is {list(shape)} in {path.name}, config.json implies {list(expected[name])}")
    if wrong:
        raise ClpRayError(f"{folder}: config.json does not match the weights: {'; '.join(wrong[:3])}"
                          f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}")


def usable_positions(config) -> int | None:
    """Tokens the model's position embeddings hold (XLM-R/RoBERTa reserve ``pad_token_id + 1``)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if getattr(config, "model_type", "") in ("xlm-roberta", "roberta", "camembert", "xlm-roberta-xl"):
        positions -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return positions


def check_max_lengths(settings, sources: dict[str, str], config, model: str, cite=None) -> None:
    """``query_max_len``/``passage_max_len`` within the model's positions: past them the embedding
    lookup fails with ``index out of bounds`` deep inside a worker. ``cite(key)`` names a config
    key as the config does (file:line); other sources are the model folder's files."""
    limit = usable_positions(config)
    if limit is None:
        return
    for key in ("query_max_len", "passage_max_len"):
        value = getattr(settings, key)
        if value > limit:
            source = sources.get(key, "defaults")
            where = cite(f"model.{key}") if cite and source == "explicit" else f"model.{key} = {value} ({source})"
            raise ClpRayError(f"{where}: {model} has position embeddings for only {limit} tokens "
                              f"(max_position_embeddings = {config.max_position_embeddings}); set model.{key} <= {limit}")
