"""Score an embedding model on a BEIR-layout retrieval set (nDCG@10/@5, Recall@100, MRR@10).

    python jobs/evaluate.py --model M --data DIR [--split test] [--mode MODE] [--run-file FILE] [--summary FILE]
    python jobs/evaluate.py --compare A B --data DIR        # paired t-test on per-query nDCG@10

MODE (default eval.mode): dense, or for models with BGE-M3's heads sparse, colbert, hybrid; ``all``
scores every mode the model has from one encoding pass.

M: a hub id, a local folder (MoE folders from training included), ``tiny``, or ``models:/<name>@<alias>``.
Without --model/--data the config's model and eval.data_dir are used (--lang/--profile/--set).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_ray.cli import config_from_args, experiment_parser, run_job  # noqa: E402
from clp_ray.util.atomic import check_writable  # noqa: E402

log = logging.getLogger("clp_ray.evaluate")


def main(args) -> dict:
    # The library (torch, Ray, MLflow) is imported here, not at the top: --help and bad arguments answer at once.
    from clp_ray.errors import ClpRayError
    from clp_ray.evaluation import compare, evaluate_modes, format_metrics, load_beir, model_eval_modes, write_trec_run
    from clp_ray.tracking.model_refs import load_model_ref
    from clp_ray.tracking.runs import tracking_uri
    from clp_ray.util.output_guard import beir_inputs, check_outputs, model_inputs

    cfg = config_from_args(args)
    data_dir = args.data or cfg.eval.data_dir
    if not data_dir:
        raise ClpRayError("no evaluation data: pass --data DIR or set eval.data_dir")
    split = args.split or cfg.eval.test_split
    models = args.compare or [args.model or cfg.model.name_or_path]
    check_outputs({"--run-file": args.run_file, "--summary": args.summary},
                  {**beir_inputs(data_dir, split), **model_inputs(*models)})
    if args.run_file:
        check_writable(args.run_file, "--run-file")
    data = load_beir(data_dir, split, miracl_root=cfg.eval.miracl_root)
    log.info("evaluation set %s: %d queries, %d documents (hash %s)", data.name, len(data.queries), len(data.corpus),
             data.content_hash())
    if args.mode == "all" and args.compare:
        raise ClpRayError("--compare compares one mode: pass --mode dense|sparse|colbert|hybrid")
    results, settings, by_mode = {}, {}, {}
    for ref in models:
        if ref in results:
            raise ClpRayError(f"--compare needs two different models, got {ref!r} twice")
        # A model named here gets its own folder's settings; only --set values overrule them.
        model_cfg = config_from_args(args, model=ref).model
        # models:/ references resolve in the config's MLflow store, as the tune job registered them.
        embedder = load_model_ref(ref, model_cfg, tracking_uri=tracking_uri(cfg))
        settings[ref] = {"settings": embedder.settings.to_dict(), "sources": embedder.settings_sources}
        modes = model_eval_modes(embedder) if args.mode == "all" else [args.mode or cfg.eval.mode]
        e = cfg.eval
        by_mode = evaluate_modes(embedder, data, modes, batch_size=e.batch_size, chunk_size=e.chunk_size, top_k=e.top_k,
                                 hybrid_weights=e.hybrid_weights.model_dump(), rerank_depth=e.rerank_depth,
                                 show_progress=True)
        results[ref] = by_mode[modes[0]]
        if args.run_file and len(models) == 1:
            write_trec_run(args.run_file, results[ref].run)
    rows = ({f"{ref} ({next(iter(by_mode))})": r for ref, r in results.items()} if args.compare
            else {f"{models[0]} ({m})": r for m, r in by_mode.items()})
    width = max(len(m) for m in rows)
    print(f"\n{'model':<{width}}  " + "  ".join(f"{k:>10}" for k in next(iter(rows.values())).metrics))
    for name, res in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{v:>10.4f}" for v in res.metrics.values()))
    summary = {"data": str(data_dir), "split": split, "eval_set_hash": data.content_hash(),
               "num_queries": len(data.queries), "num_docs": len(data.corpus), "model_settings": settings}
    if args.compare:
        a, b = models
        c = compare(results[a], results[b], "ndcg@10")
        print(f"\nnDCG@10 over {c.num_queries} queries: A {c.mean_a:.4f}  B {c.mean_b:.4f}  "
              f"B-A {c.diff:+.4f}  paired t-test p = {c.p_value:.4g}")
        summary["models"] = {ref: r.metrics for ref, r in results.items()}
        summary["comparison"] = {"metric": c.metric, "a": a, "b": b, "mean_a": c.mean_a, "mean_b": c.mean_b,
                                 "diff": c.diff, "p_value": c.p_value}
    else:
        (ref, res), = results.items()
        log.info("%s: %s", ref, format_metrics(res.metrics))
        summary.update(model=ref, mode=next(iter(by_mode)), metrics=res.metrics, run_file=args.run_file,
                       modes={m: r.metrics for m, r in by_mode.items()})
    return summary


def parser():
    ap = experiment_parser(__doc__.splitlines()[0], lang_required=False)
    ap.add_argument("--model", help="hub id, local folder, 'tiny' or models:/<name>@<alias> (default: model.name_or_path)")
    ap.add_argument("--data", help="BEIR-layout folder or miracl://<lang> (default: eval.data_dir)")
    ap.add_argument("--split", help="qrels split (default: eval.test_split)")
    ap.add_argument("--run-file", help="write the TREC run file here (of the first mode)")
    ap.add_argument("--mode", choices=["dense", "sparse", "colbert", "hybrid", "all"],
                    help="how pairs are scored (default: eval.mode); all: every mode the model has")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="evaluate two models and test the difference")
    return ap


if __name__ == "__main__":
    sys.exit(run_job(main, parser().parse_args()))
