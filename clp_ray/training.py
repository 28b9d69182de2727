"""Kept for code written against the old single module: the training run now lives in
:mod:`clp_ray.train` (preflight, deepspeed_config, schedule, payload, engine, worker, run)."""

from clp_ray.train import *  # noqa: F401,F403
from clp_ray.train import __all__  # noqa: F401
