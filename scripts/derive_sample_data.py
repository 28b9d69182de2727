"""Derive the bundled Korean retrieval sample from Debian's ``libreoffice-help-ko``.

The LibreOffice help index (``bookmarks.js``) maps keywords written by the help's authors to the
page they describe: human-curated query -> page relevance. Pages are the visible text of
``<div id="DisplayArea">``. Pages are split into train/dev/test by a hash of their id, so the three
splits are document-disjoint; a keyword is kept only when all its pages fall in one split.

Usage (the output is committed under ``clp_ray/assets/ko_help``)::

    apt-get download libreoffice-help-ko && dpkg-deb -x libreoffice-help-ko_*.deb /tmp/lo
    python scripts/derive_sample_data.py --src /tmp/lo --out clp_ray/assets/ko_help

Licence: the help text is MPL-2.0 (see ``clp_ray/assets/ko_help/NOTICE``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

BOOKMARK = re.compile(r'\{url:"([^"]+)", app:"([^"]*)", text:"([^"]*)"\}')
MAX_CHARS = 400  # keeps the bundle to a few MB while leaving whole paragraphs
NEGATIVES = 4
MAX_TRAIN_RECORDS = 500


class DisplayAreaText(HTMLParser):
    """Collects the visible text inside ``<div id="DisplayArea">``."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # div depth inside DisplayArea; 0 = outside
        self.skip = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            if self.depth:
                self.depth += 1
            elif dict(attrs).get("id") == "DisplayArea":
                self.depth = 1
        if tag in ("script", "style"):
            self.skip += 1

    def handle_endtag(self, tag):
        if tag == "div" and self.depth:
            self.depth -= 1
        if tag in ("script", "style") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        return re.sub(r"\s+", " ", " ".join(self.parts)).strip()


def page_text(path: Path) -> str:
    parser = DisplayAreaText()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.text()


def split_of(doc_id: str) -> str:
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 70 else "dev" if bucket < 85 else "test"


def bigrams(text: str) -> set[str]:
    t = text.lower()
    return {t[i : i + 2] for i in range(len(t) - 1) if not t[i : i + 2].isspace()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="root of the extracted .deb")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    help_root = args.src / "usr/share/libreoffice/help"
    bookmarks = (help_root / "ko/bookmarks.js").read_text(encoding="utf-8")

    docs: dict[str, str] = {}
    query_pages: dict[str, set[str]] = defaultdict(set)
    for url, _app, keyword in BOOKMARK.findall(bookmarks):
        rel = url.split("?")[0].split("#")[0]
        doc_id = rel.removeprefix("ko/text/").removesuffix(".html")
        if doc_id not in docs:
            f = help_root / rel
            docs[doc_id] = page_text(f)[:MAX_CHARS] if f.exists() else ""
        query = re.sub(r"\s+", " ", keyword.replace(" -- ", " ")).strip()
        if query and docs[doc_id]:
            query_pages[query].add(doc_id)
    docs = {d: t for d, t in docs.items() if len(t) >= 40}

    queries: dict[str, dict] = {}
    by_split: dict[str, list[str]] = defaultdict(list)
    dropped = 0
    for i, (text, pages) in enumerate(sorted(query_pages.items())):
        pages = {p for p in pages if p in docs}
        splits = {split_of(p) for p in pages}
        if len(splits) != 1:
            dropped += 1
            continue
        qid = f"q{i:05d}"
        queries[qid] = {"text": text, "pages": sorted(pages)}
        by_split[splits.pop()].append(qid)

    out = args.out
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id in sorted(docs):
            f.write(json.dumps({"_id": doc_id, "title": "", "text": docs[doc_id]}, ensure_ascii=False) + "\n")
    eval_qids = sorted(by_split["dev"] + by_split["test"])
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid in eval_qids:
            f.write(json.dumps({"_id": qid, "text": queries[qid]["text"]}, ensure_ascii=False) + "\n")
    for split in ("dev", "test"):
        with open(out / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid in sorted(by_split[split]):
                for doc_id in queries[qid]["pages"]:
                    f.write(f"{qid}\t{doc_id}\t1\n")

    # CLP training records from train-split pages only. Hard negatives: the train pages sharing the
    # most character bigrams with the query's positive page; neg_q: one of the negative's own keywords.
    rng = random.Random(args.seed)
    train_qids = sorted(by_split["train"])
    page_queries: dict[str, list[str]] = defaultdict(list)
    for qid in train_qids:
        for p in queries[qid]["pages"]:
            page_queries[p].append(queries[qid]["text"])
    candidates = sorted(page_queries)
    grams = {p: bigrams(docs[p]) for p in candidates}
    rng.shuffle(train_qids)
    n_records = 0
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for qid in train_qids[:MAX_TRAIN_RECORDS]:
            q = queries[qid]
            pos_pages = q["pages"]
            anchor = grams[pos_pages[0]] | bigrams(q["text"])
            ranked = sorted(
                (p for p in candidates if p not in pos_pages),
                key=lambda p: (-len(anchor & grams[p]) / (len(grams[p]) + 1), p),
            )
            negs = ranked[:NEGATIVES]
            record = {
                "query": q["text"],
                "pos": [docs[p] for p in pos_pages],
                "neg": [docs[p] for p in negs],
                "neg_q": [rng.choice([t for t in page_queries[p] if t != q["text"]] or page_queries[p]) for p in negs],
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n_records += 1
    print(
        f"docs={len(docs)} queries={len(queries)} (dropped {dropped} spanning splits) "
        f"train={len(by_split['train'])} dev={len(by_split['dev'])} test={len(by_split['test'])} "
        f"train_records={n_records}"
    )


if __name__ == "__main__":
    main()
