"""Build CLP training data: mine hard negatives and give each one its own query (neg_q).

    python jobs/mine.py --lang hi --model M --corpus corpus.jsonl --queries queries.jsonl \\
        --qrels qrels/train.tsv --out train.jsonl [--summary FILE] [--set mining.rank_window=[10,100]]
    python jobs/mine.py --lang hi --model M --data miracl://hi --split train --out train.jsonl   # or a BEIR folder

M: a hub id, a local folder, `tiny`, or models:/<name>@<alias>. Settings: the `mining` config section.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_ray.cli import config_from_args, experiment_parser, run_job  # noqa: E402
from clp_ray.util.atomic import check_writable  # noqa: E402

log = logging.getLogger("clp_ray.mine")


def main(args) -> dict:
    # The library (torch, Ray, MLflow) is imported here, not at the top: --help and bad arguments answer at once.
    from clp_ray.data import validate
    from clp_ray.errors import ClpRayError
    from clp_ray.evaluation import load_beir, load_beir_files
    from clp_ray.mining import encode_with_ray_data, mine, search_with_ray_data, write_records
    from clp_ray.model.source import resolve_source
    from clp_ray.tracking.model_refs import load_model_ref
    from clp_ray.tracking.runs import tracking_uri
    from clp_ray.train import ensure_ray
    from clp_ray.util.output_guard import beir_inputs, check_outputs, model_inputs

    # A model named with --model gets its own folder's settings; only --set values overrule them.
    cfg = config_from_args(args, model=args.model)
    inputs = {"--corpus": args.corpus, "--queries": args.queries, "--qrels": args.qrels,
              **beir_inputs(args.data, args.split), **model_inputs(args.model)}
    check_outputs({"--out": args.out, "--summary": args.summary}, inputs)
    check_writable(args.out, "--out")
    m = cfg.mining
    if args.data:
        data = load_beir(args.data, args.split, miracl_root=cfg.eval.miracl_root)
    elif args.corpus and args.queries and args.qrels:
        data = load_beir_files(args.corpus, args.queries, args.qrels, name="mining")
    else:
        raise ClpRayError("give --data DIR|miracl://<lang> [--split train], or all of --corpus, --queries and --qrels")
    # Decided once, here (absolute folder, tiny's or the offline rebuild's folder): the Ray Data
    # actors load the same model in another working directory.
    model_ref = resolve_source(args.model or cfg.model.name_or_path, cfg.model.tiny)
    store = tracking_uri(cfg)  # where models:/ references resolve
    embedder = load_model_ref(model_ref, cfg.model, tracking_uri=store)  # fails early on a bad model reference
    doc_ids, qids = list(data.corpus), list(data.queries)
    corpus_texts, query_texts = [data.corpus[d] for d in doc_ids], [data.queries[q] for q in qids]
    log.info("mining %d queries against %d passages with %s (%s engine)", len(qids), len(doc_ids), model_ref, m.engine)
    search = None
    if m.engine == "ray":
        ensure_ray(cfg)
        kw = {"batch_size": cfg.eval.batch_size, "concurrency": m.actors, "use_gpu": cfg.ray.use_gpu,
              "model_cfg": cfg.model, "tracking_uri": store}
        d_emb = encode_with_ray_data(model_ref, corpus_texts, kind="passage", **kw)
        q_emb = encode_with_ray_data(model_ref, query_texts, kind="query", **kw)
        search = search_with_ray_data(q_emb, d_emb, m.top_k, chunk_size=cfg.eval.chunk_size, concurrency=m.actors)
    else:
        d_emb = embedder.encode(corpus_texts, batch_size=cfg.eval.batch_size, kind="passage",
                                show_progress=True, desc="encode corpus")
        q_emb = embedder.encode(query_texts, batch_size=cfg.eval.batch_size, kind="query",
                                show_progress=True, desc="encode queries")
    records, stats = mine(q_emb, d_emb, qids, doc_ids, data.queries, data.corpus, data.qrels, m,
                          chunk_size=cfg.eval.chunk_size, show_progress=True, search=search)
    # The output must pass the training validator before it replaces anything: a failed run leaves
    # the previous file as it was.
    out = write_records(records, args.out, stats, check=lambda tmp: validate([str(tmp)], require_neg_q=True, group_size=2))
    report = validate([str(out)], require_neg_q=True, group_size=2)  # its content hash, under its own name
    s = stats.to_dict()
    print(f"\nwrote {out}: {s['written']} records, {s['negatives_per_query']:.2f} negatives per query")
    print(f"neg_q sources: {s['neg_q_from_qrels']} from qrels, {s['neg_q_generated']} generated, "
          f"{s['negatives_dropped']} negatives dropped (no known query); {s['skipped_no_negatives']} queries without "
          f"negatives skipped; {s['candidates_guarded']} candidates skipped by the false-negative margin")
    inputs = [args.data] if args.data else [args.corpus, args.queries, args.qrels]
    return {"out": str(out), "content_hash": report.content_hash, "inputs": inputs, **s}


def parser():
    ap = experiment_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", help="model to mine with (default: model.name_or_path)")
    ap.add_argument("--data", help="BEIR folder or miracl://<lang> (the evaluation loaders); or the three files below")
    ap.add_argument("--split", default="train", help="qrels split with --data (default: train)")
    ap.add_argument("--corpus", help="corpus.jsonl")
    ap.add_argument("--queries", help="queries.jsonl")
    ap.add_argument("--qrels", help="judgements of the training queries (BEIR TSV)")
    ap.add_argument("--out", required=True, help="CLP JSONL to write (atomically)")
    return ap


if __name__ == "__main__":
    sys.exit(run_job(main, parser().parse_args()))
