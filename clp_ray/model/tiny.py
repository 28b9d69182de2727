"""A tiny, seeded, XLM-R-shaped encoder with an offline-trained tokenizer.

Stands in for BGE-M3 in tests and the offline ``local`` profile: nothing comes from the Hugging
Face hub. The tokenizer is a byte-level BPE (deterministic, unlike Unigram training) trained on the
bundled Korean help corpus; the encoder is ``XLMRobertaModel`` with random weights from a seed.
With ``m3_heads`` the folder also holds random BGE-M3 ``sparse_linear.pt`` / ``colbert_linear.pt``
(the hub layout), a tiny M3-shaped model. Both are cached on disk under ``$CLP_RAY_CACHE`` (default ``~/.cache/clp-ray``) keyed by a hash of
the settings and the training text, and built atomically so concurrent workers never see half a
folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

from clp_ray.config import ASSETS_DIR, TinyModelConfig
from clp_ray.model.m3 import M3Heads, save_heads
from clp_ray.model.settings import META_FILE, EmbedSettings
from clp_ray.model.st_files import write_sentence_transformers_files
from clp_ray.util.atomic import atomic_path
from clp_ray.util.cache import cache_root  # noqa: F401  (re-exported: clp_ray.model.tiny.cache_root)

log = logging.getLogger(__name__)

TEXT_FILE = ASSETS_DIR / "ko_help" / "corpus.jsonl"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R ids 0..3, mask last
_FORMAT = 3  # bump when the build below changes
# How the tiny model embeds, written into its folder (clp_ray.json) so it describes itself
# wherever it is loaded: a random encoder has no trained CLS token, and mean pooling learns fast.
SETTINGS = {"pooling": "mean", "normalize": True, "query_max_len": 32, "passage_max_len": 128}


def _training_text() -> list[str]:
    with open(TEXT_FILE, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def tiny_model_path(spec: TinyModelConfig | None = None) -> Path:
    """Folder of the tiny model for ``spec``; built on first use, then reused."""
    spec = spec or TinyModelConfig()
    key = json.dumps({"spec": spec.model_dump(), "format": _FORMAT, "text": _file_digest(TEXT_FILE)}, sort_keys=True)
    path = cache_root() / "tiny" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "config.json").exists():
        return path
    log.info("building tiny offline encoder in %s", path)
    # Several workers may build it at once: the first folder published stays (never moved aside).
    with atomic_path(path, is_dir=True, keep_existing=True) as tmp:
        _build(spec, tmp)
    return path


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _build(spec: TinyModelConfig, out: Path) -> None:

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=spec.max_position_embeddings - 2,
    )
    tokenizer.save_pretrained(out)

    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        type_vocab_size=1,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = XLMRobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(out)
    if spec.m3_heads:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed + 1)
            save_heads(M3Heads(spec.hidden_size), out)  # sparse_linear.pt, colbert_linear.pt
    (out / META_FILE).write_text(json.dumps({"format": 2, **SETTINGS, "moe": None}, indent=2) + "\n")
    write_sentence_transformers_files(out, EmbedSettings(**SETTINGS), spec.hidden_size, moe=False)
