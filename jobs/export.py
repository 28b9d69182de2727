"""Export a model as a sentence-transformers folder or as ONNX (dense models), parity-checked.

    python jobs/export.py --model REF --out DIR [--format sentence-transformers|onnx] [--summary FILE]

REF: a hub id, a local folder (MoE folders included), ``tiny``, or ``models:/<name>@<alias>``.
sentence-transformers: ``SentenceTransformer(DIR)`` (``trust_remote_code=True`` for an MoE model).
onnx: ``DIR/model.onnx`` (input_ids, attention_mask -> sentence_embedding, pooled and normalised),
the tokenizer and ``clp_ray.json``; an MoE model exits 2 with the reason.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_ray.cli import config_from_args, experiment_parser, run_job  # noqa: E402
from clp_ray.util.atomic import check_writable  # noqa: E402

log = logging.getLogger("clp_ray.model.export")
FORMATS = ("sentence-transformers", "onnx")  # clp_ray.model.export.FORMATS, without importing torch for --help


def main(args) -> dict:
    from clp_ray.errors import ClpRayError
    from clp_ray.model.export import export_model
    from clp_ray.tracking.model_refs import load_model_ref
    from clp_ray.tracking.runs import tracking_uri
    from clp_ray.util.output_guard import check_outputs, model_inputs

    out = Path(args.out).absolute()
    if out.exists() and not out.is_dir():
        raise ClpRayError(f"--out: {args.out} is a file, not a folder")
    check_outputs({"--out": args.out, "--summary": args.summary}, model_inputs(args.model), folders=["--out"],
                  job="export", overwrite=args.overwrite)
    check_writable(out.parent, "--out", folder=True)  # the folder itself appears only once the export passed
    cfg = config_from_args(args)
    model_cfg = config_from_args(args, model=args.model).model
    embedder = load_model_ref(args.model, model_cfg, tracking_uri=tracking_uri(cfg))
    result = export_model(embedder, args.out, args.format)
    log.info("exported %s as %s to %s: %d files, max |diff| vs Embedder.encode %.2g (%s)", args.model, result.format,
             result.out, len(result.files), result.max_abs_diff, result.checked_with)
    return {"model": args.model, **result.to_dict(), "settings": embedder.settings.to_dict(),
            "moe": embedder.moe_spec.to_dict() if embedder.moe_spec else None}


def parser():
    ap = experiment_parser(__doc__.splitlines()[0], lang_required=False)
    ap.add_argument("--model", required=True, help="hub id, local folder, 'tiny' or models:/<name>@<alias>")
    ap.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    ap.add_argument("--format", choices=FORMATS, default="sentence-transformers")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out even when it is a non-empty folder that export did not write")
    return ap


if __name__ == "__main__":
    sys.exit(run_job(main, parser().parse_args()))
