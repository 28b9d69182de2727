"""Shared command-line plumbing for the thin ``jobs/`` entry points (and the benchmarks' arguments).

Every job gets ``--lang``, ``--profile``, ``--set``, ``--config-dir``, ``--print-config`` and
``--summary``; user errors (:class:`~clp_ray.errors.ClpRayError`) print one clear message and exit 2
instead of a traceback; the JSON summary is written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from clp_ray.config import ExperimentConfig, known_profiles, load_config
from clp_ray.errors import ClpRayError, ConfigError, JobInterrupted
from clp_ray.util.atomic import check_writable, write_json
from clp_ray.util.redact import install_log_filter, redact, redact_obj

EXIT_USER_ERROR = 2


def experiment_parser(description: str, *, lang_required: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--lang", required=lang_required, help="language config: configs/lang/<lang>.yaml")
    ap.add_argument(
        "--profile", default=None,
        help="configs/profiles/<profile>.yaml (default: $CLP_RAY_PROFILE or 'local')",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set loss.lam=0.2 (repeatable, applied in order)")
    ap.add_argument("--config-dir", default=None, help="folder with base.yaml, lang/, profiles/ (default: ./configs of the repo)")
    ap.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    add_summary_arg(ap)
    return ap


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``, or a usage error that says so."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names it in "invalid int value: 'x'"
    return parse


def add_summary_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--summary", default=None, metavar="PATH", help="write a JSON summary of the result here (atomically)")


def config_from_args(args: argparse.Namespace, model: Optional[str] = None) -> ExperimentConfig:
    """The job's config; with ``model`` (a ``--model REF`` other than the config's own model) the
    model settings the config files wrote for their model give way to ``REF``'s own folder."""
    profile = job_profile(args)
    cfg = load_config(args.lang, profile, args.overrides, config_dir=args.config_dir)
    if model is None or model == cfg.model.name_or_path:
        return cfg
    return load_config(args.lang, profile, args.overrides, config_dir=args.config_dir, model=model)


def job_profile(args: argparse.Namespace) -> str:
    """``--profile``, else ``$CLP_RAY_PROFILE``, else ``local``; a bad variable is named as such."""
    if getattr(args, "profile", None) is not None:
        return args.profile
    value = os.environ.get("CLP_RAY_PROFILE")
    if value is None:
        return "local"
    known = known_profiles(Path(args.config_dir) if args.config_dir else None)
    if value.strip() not in known:
        what = "is set but empty" if not value.strip() else f"= {value!r} names no profile"
        raise ConfigError(f"environment variable CLP_RAY_PROFILE {what}; known profiles: {', '.join(known)} "
                          "(unset it for 'local', or pass --profile)")
    return value.strip()


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("CLP_RAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    install_log_filter()  # no credentials in log lines


def run_job(main: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> int:
    """Run ``main(args) -> summary dict``: write ``--summary``, map user errors to exit code 2."""
    setup_logging()
    try:
        if getattr(args, "print_config", False):
            print(redact(config_from_args(args).to_yaml()), end="")
            return 0
        if args.summary:
            check_writable(args.summary, "--summary")
        summary: Optional[dict] = main(args)
    except JobInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except ClpRayError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.summary and summary is not None:
        summary = redact_obj(summary)
        try:
            write_json(args.summary, summary)
        except OSError as e:  # e.g. the disk filled up during the job: keep the result on stdout
            print(json.dumps(summary, indent=2, sort_keys=True, default=str))
            print(f"error: --summary: cannot write to {args.summary} ({e.strerror or e}); "
                  "the summary is printed above", file=sys.stderr)
            return EXIT_USER_ERROR
        logging.getLogger("clp_ray").info("summary written to %s", args.summary)
    return 0
