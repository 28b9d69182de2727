"""MLflow: runs and their lineage (:mod:`.runs`), the model registry and champion promotion
(:mod:`.registry`), and the registered model's pyfunc (:mod:`.pyfunc`)."""

from clp_ray.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "runs": ['Tracker', 'check_tracking', 'ending', 'ensure_experiment', 'experiment_name', 'git_commit', 'metric_key', 'registered_model_name', 'resume_or_start_run', 'start_run', 'start_run_retrying', 'tracking_uri', 'with_driver_tracking'],
    "pyfunc": ['EmbedderPyfunc'],
})
