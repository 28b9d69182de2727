"""Kept for code written against the old single module: the sweep now lives in :mod:`clp_ray.tune`
(space, trial, sweep, job)."""

from clp_ray.tune import *  # noqa: F401,F403
from clp_ray.tune import __all__  # noqa: F401
