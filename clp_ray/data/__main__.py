"""``python -m clp_ray.data FILE_OR_DIR ... [--lam 0.1] [--group-size 8]``: validate and report;
exit 0 only when every record is good."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from clp_ray.data.report import MAX_LISTED
from clp_ray.data.validation import DUPLICATE_POLICIES, validate
from clp_ray.errors import ConfigError, DataError


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clp_ray.data", description="Validate CLP training JSONL files.")
    ap.add_argument("paths", nargs="+", help="JSONL files (.jsonl, .jsonl.gz) or folders (local or fsspec URLs)")
    ap.add_argument("--lam", type=float, default=0.0, help="loss.lam of the training run (> 0 requires neg_q)")
    ap.add_argument("--group-size", type=int, default=2, help="data.train_group_size (> 1 requires negatives)")
    ap.add_argument("--max-line-bytes", type=int, default=1_000_000)
    ap.add_argument("--on-bad-record", choices=("error", "skip"), default="skip",
                    help="error: stop at the first 20 problems; skip (default): report every bad record")
    ap.add_argument("--rejects", metavar="PATH", help="with skip: write each rejected line, bytes included, here")
    ap.add_argument("--on-duplicate", choices=DUPLICATE_POLICIES, default="keep",
                    help="records identical to an earlier one: keep (counted), drop, or error (bad records)")
    ap.add_argument("--all", action="store_true", help="list every problem, not only the first 20")
    args = ap.parse_args(argv)
    if args.rejects and args.on_bad_record != "skip":
        ap.error("--rejects needs --on-bad-record skip")
    try:
        report = validate(args.paths, require_neg_q=args.lam > 0, group_size=args.group_size, max_line_bytes=args.max_line_bytes,
                          on_bad_record=args.on_bad_record, rejects_path=args.rejects, on_duplicate=args.on_duplicate)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # an output that would overwrite an input
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text(limit=None if args.all else MAX_LISTED))
    print(f"content hash: {report.content_hash}")
    return 0 if report.bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
