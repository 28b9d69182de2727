"""Retrieval evaluation: sets (BEIR, MIRACL), exact search, IR metrics, the dev set selection scores on."""

from clp_ray.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "sets": ['RetrievalSet', 'load_beir', 'load_beir_files', 'load_miracl'],
    "metrics": ['Comparison', 'EvalResult', 'METRICS', 'compare', 'format_metrics', 'load_result', 'paired_p_value', 'save_result', 'score_run', 'write_trec_run'],
    "search": ['exact_search'],
    "evaluator": ['evaluate', 'evaluate_config', 'evaluate_modes', 'evaluate_sets', 'model_eval_modes'],
})
