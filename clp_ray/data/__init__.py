"""CLP training data (../shared/DESIGN.md §3): files, record rules, validation, the datasets-backed
loading and dev split, groups and batches.

Record (JSON Lines, one per line)::

    {"query": str, "pos": [str, ...], "neg": [str, ...], "neg_q": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...]}        # scores optional

``neg_q[i]`` is the query that ``neg[i]`` is relevant to. ``python -m clp_ray.data FILE_OR_DIR ...``
validates files and prints the report (:mod:`clp_ray.data.__main__`)."""

from clp_ray.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "report": ['MAX_LISTED', 'Problem', 'ValidationReport'],
    "files": ['BOM', 'DATA_SUFFIXES', 'GZIP_MAGIC', 'expand_paths', 'iter_lines', 'open_data_file'],
    "records": ['check_record', 'normalize_record'],
    "validation": ['DUPLICATE_POLICIES', 'ScanStats', 'scan_files', 'validate'],
    "dataset": ['load_records', 'split_train_dev'],
    "batching": ['Bucketed', 'Collator', 'Group', 'rank_batches', 'sample_group', 'shard_indices', 'steps_per_epoch'],
    "__main__": ['main'],
})
