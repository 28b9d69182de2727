"""Serve every language's @champion model over HTTP (Ray Serve, OpenAI-compatible /v1/embeddings).

    python jobs/serve.py --langs hi,ko [--alias champion] [--host 127.0.0.1] [--port 8000] [--profile P]
    python jobs/serve.py --lang hi ...          # one language

Runs until interrupted (Ctrl-C / SIGTERM), then shuts the app down. Once every model is loaded it
logs the URL and writes --summary (url, models, versions, auth). API keys come from
$CLP_RAY_API_KEYS or serve.api_keys_file; without them the app is open, which only a loopback host
allows unless serve.require_api_keys=false (the cluster profile refuses to start without keys).
Replicas, resources, batching and the alias poll interval come from the ``serve`` config section
(``--set serve.num_replicas=2``).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clp_ray.cli import config_from_args, experiment_parser, run_job  # noqa: E402

log = logging.getLogger("clp_ray.serving.app")
APP_NAME = "clp-ray"


def main(args) -> dict:
    from clp_ray.errors import ClpRayError

    langs = [x.strip() for x in args.langs.split(",") if x.strip()] if args.langs else []
    args.lang = args.lang or (langs[0] if langs else None)
    if not args.lang:
        raise ClpRayError("name the languages to serve: --lang hi or --langs hi,ko")
    overrides = [f"serve.{key}={value}" for key, value in (("alias", args.alias), ("host", args.host), ("port", args.port))
                 if value is not None]
    args.overrides = [*overrides, *args.overrides]
    cfg = config_from_args(args)
    return serve_until_stopped(cfg, langs or [args.lang], args.summary)


def serve_until_stopped(cfg, langs: list[str], summary_path) -> dict:
    from ray import serve

    from clp_ray.serving.app import ServeSettings, app_for
    from clp_ray.serving.auth import describe
    from clp_ray.train.run import ensure_ray
    from clp_ray.util.atomic import write_json

    settings = ServeSettings.from_config(cfg, langs)  # before Ray starts: a cluster profile without keys stops here
    keys = settings.api_keys
    log.info("%s", describe(keys, cfg.serve))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ensure_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        log.info("deploying %s (%d replica(s), %s CPU / %s GPU each); loading the @%s models", ", ".join(langs),
                 cfg.serve.num_replicas, cfg.serve.num_cpus, cfg.serve.num_gpus, cfg.serve.alias)
        serve.run(app_for(cfg, langs, settings), name=APP_NAME, route_prefix="/")  # returns once the replicas are up
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        status, readyz = _get(f"http://127.0.0.1:{cfg.serve.port}/readyz" if cfg.serve.host == "0.0.0.0" else f"{url}/readyz")
        summary = {"url": url, "endpoint": f"{url}/v1/embeddings", "langs": langs, "alias": cfg.serve.alias,
                   "auth": "api_keys" if keys.required else "open", "ready": status == 200, "readyz": readyz}
        if status != 200:
            log.warning("not every model is loaded (%s); the replicas keep polling MLflow every %.0f s",
                        readyz.get("missing"), cfg.serve.poll_interval_s)
        log.info("serving %s at %s/v1/embeddings (ready: %s); Ctrl-C stops", ", ".join(langs), url, summary["ready"])
        if summary_path:
            write_json(summary_path, summary)
        while not stop.wait(1.0):
            pass
        log.info("stopping")
        return summary
    finally:
        serve.shutdown()


def _get(url: str) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def parser():
    ap = experiment_parser(__doc__.splitlines()[0], lang_required=False)
    ap.add_argument("--langs", help="comma-separated languages to serve (default: --lang)")
    ap.add_argument("--alias", help="registry alias to serve (default: serve.alias, 'champion')")
    ap.add_argument("--host", help="HTTP host (default: serve.host)")
    ap.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    return ap


if __name__ == "__main__":
    sys.exit(run_job(main, parser().parse_args()))
