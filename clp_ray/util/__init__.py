"""Plumbing every layer uses: atomic writes, locks, caches, lazy re-exports, redaction, storage
locations, text checks, bounded YAML and the guard that keeps outputs off inputs."""
