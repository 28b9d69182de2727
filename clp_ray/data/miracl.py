"""MIRACL from its published files, without the datasets loading scripts ``datasets`` >= 4 refuses.

The two dataset repos on the Hugging Face hub hold (``huggingface.co/datasets/miracl/miracl`` and
``huggingface.co/datasets/miracl/miracl-corpus``; the same layout FlagEmbedding's MIRACL loader
and Pyserini's regressions read)::

    miracl/miracl/miracl-v1.0-<lang>/topics/topics.miracl-v1.0-<lang>-<split>.tsv   qid<TAB>query
    miracl/miracl/miracl-v1.0-<lang>/qrels/qrels.miracl-v1.0-<lang>-<split>.tsv     qid<TAB>Q0<TAB>docid<TAB>relevance
    miracl/miracl-corpus/miracl-corpus-v1.0-<lang>/docs-<n>.jsonl.gz                {"docid", "title", "text"} per line

Splits are ``train``, ``dev``, ``test-a`` and ``test-b`` (``testA``/``testB`` are accepted); only
splits with qrels can be evaluated or mined. Relevance 0 marks a passage judged *not* relevant and
stays in the qrels as such. The root (``eval.miracl_root``) is ``hf://datasets`` — files fetched
with ``huggingface_hub`` into its cache, so a second run reads the disk — or any folder or fsspec
URL with the same layout (a mirror, or the test fixture). The corpus is streamed shard by shard,
line by line, straight into the ``{docid: text}`` map: it is held once.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import IO

import fsspec
from huggingface_hub import HfApi, hf_hub_download

from clp_ray.errors import DataError

log = logging.getLogger(__name__)

HUB_ROOT = "hf://datasets"
TOPICS_REPO = "miracl/miracl"
CORPUS_REPO = "miracl/miracl-corpus"
_SPLIT_ALIASES = {"testA": "test-a", "testB": "test-b"}


class MiraclFiles:
    """Lists and opens files of the two MIRACL repos under one root (the hub or a folder/URL)."""

    def __init__(self, root: str = HUB_ROOT):
        self.root = root.rstrip("/")
        self.hub = self.root == HUB_ROOT

    def where(self) -> str:
        return "the Hugging Face hub" if self.hub else self.root

    def list(self, repo: str, folder: str) -> list[str]:
        """Paths (relative to the repo) of the files directly in ``folder``."""
        if self.hub:

            files = HfApi().list_repo_files(repo, repo_type="dataset")
            return sorted(f for f in files if f.rsplit("/", 1)[0] == folder)

        fs, base = fsspec.core.url_to_fs(f"{self.root}/{repo}/{folder}")
        if not fs.isdir(base):
            return []
        return sorted(f"{folder}/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in fs.ls(base, detail=False))

    def open(self, repo: str, path: str) -> IO[bytes]:
        if self.hub:

            return open(hf_hub_download(repo, path, repo_type="dataset"), "rb")

        return fsspec.open(f"{self.root}/{repo}/{path}", "rb").open()


def split_name(split: str) -> str:
    return _SPLIT_ALIASES.get(split, split)


def load(lang: str, split: str, root: str = HUB_ROOT) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """MIRACL ``lang``/``split`` as (corpus, judged queries, qrels) — what
    :func:`clp_ray.evaluation.load_miracl` turns into a retrieval set."""

    files = MiraclFiles(root)
    split = split_name(split)
    try:
        topics_path, qrels_path = _split_files(files, lang, split)
        queries = dict(_topics(files, topics_path))
        qrels = _qrels(files, qrels_path)
        corpus = _corpus(files, lang)
    except DataError:
        raise
    except Exception as e:  # network, auth, a missing repo: all mean "cannot load" here
        raise DataError(f"cannot load MIRACL {lang!r} split {split!r} from {files.where()}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    unknown_q = sorted(set(qrels) - set(queries))
    unknown_d = sorted({d for rels in qrels.values() for d in rels} - set(corpus))
    if unknown_q or unknown_d:
        raise DataError(f"MIRACL {lang}/{split} from {files.where()}: qrels name {len(unknown_q)} unknown query id(s) "
                        f"{unknown_q[:3]} and {len(unknown_d)} unknown passage id(s) {unknown_d[:3]}")
    judged = {q: queries[q] for q in sorted(qrels)}
    log.info("MIRACL %s/%s: %d judged queries, %d passages (%s)", lang, split, len(judged), len(corpus), files.where())
    return corpus, judged, qrels


def _split_files(files: MiraclFiles, lang: str, split: str) -> tuple[str, str]:
    base = f"miracl-v1.0-{lang}"
    topics = f"{base}/topics/topics.miracl-v1.0-{lang}-{split}.tsv"
    qrels = f"{base}/qrels/qrels.miracl-v1.0-{lang}-{split}.tsv"
    have_topics = files.list(TOPICS_REPO, f"{base}/topics")
    if not have_topics:
        raise DataError(f"MIRACL has no language {lang!r} at {files.where()} (no {TOPICS_REPO}/{base}/topics)")
    have_qrels = files.list(TOPICS_REPO, f"{base}/qrels")
    if topics not in have_topics or qrels not in have_qrels:
        judged = sorted(_split_of(p, lang) for p in have_qrels)
        raise DataError(f"MIRACL {lang}: no judged split {split!r} at {files.where()} (judged splits: {', '.join(judged) or 'none'})")
    return topics, qrels


def _split_of(path: str, lang: str) -> str:
    m = re.search(rf"miracl-v1\.0-{re.escape(lang)}-(.+)\.tsv$", path)
    return m.group(1) if m else path


def _lines(f: IO[bytes], where: str) -> Iterator[tuple[int, str]]:
    for n, raw in enumerate(f, 1):
        try:
            yield n, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}:{n}: invalid UTF-8 at byte {e.start}") from None


def _topics(files: MiraclFiles, path: str) -> Iterator[tuple[str, str]]:
    where = f"{TOPICS_REPO}/{path}"
    with files.open(TOPICS_REPO, path) as f:
        for n, line in _lines(f, where):
            if not line.strip():
                continue
            qid, sep, text = line.partition("\t")
            if not sep or not text.strip():
                raise DataError(f"{where}:{n}: expected query-id<TAB>query")
            yield qid, text


def _qrels(files: MiraclFiles, path: str) -> dict[str, dict[str, int]]:
    where = f"{TOPICS_REPO}/{path}"
    qrels: dict[str, dict[str, int]] = {}
    with files.open(TOPICS_REPO, path) as f:
        for n, line in _lines(f, where):
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
                raise DataError(f"{where}:{n}: expected query-id<TAB>Q0<TAB>doc-id<TAB>relevance")
            qid, _, docid, rel = parts
            if qrels.setdefault(qid, {}).setdefault(docid, int(rel)) != int(rel):
                raise DataError(f"{where}:{n}: ({qid}, {docid}) judged twice with different relevance")
    return qrels


def _corpus(files: MiraclFiles, lang: str) -> dict[str, str]:
    folder = f"miracl-corpus-v1.0-{lang}"
    shards = [p for p in files.list(CORPUS_REPO, folder) if p.endswith(".jsonl.gz")]
    if not shards:
        raise DataError(f"MIRACL {lang}: no corpus shards {CORPUS_REPO}/{folder}/docs-*.jsonl.gz at {files.where()}")
    corpus: dict[str, str] = {}
    for shard in sorted(shards, key=_shard_number):
        where = f"{CORPUS_REPO}/{shard}"
        with files.open(CORPUS_REPO, shard) as raw, gzip.open(raw) as f:
            for n, line in _lines(io.BufferedReader(f), where):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    docid, title, text = str(row["docid"]), row.get("title") or "", row.get("text") or ""
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{where}:{n}: malformed passage ({type(e).__name__}: {e})") from None
                corpus[docid] = f"{title} {text}".strip()
        log.info("MIRACL %s corpus: %s read (%d passages so far)", lang, shard, len(corpus))
    return corpus


def _shard_number(path: str) -> tuple[int, str]:
    m = re.search(r"docs-(\d+)\.jsonl\.gz$", path)
    return (int(m.group(1)) if m else 1 << 30, path)
