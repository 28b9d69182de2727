"""Errors that mean "the user's input is wrong": jobs print them without a traceback and exit 2."""

from __future__ import annotations


class ClpRayError(Exception):
    """Base class for problems a user can fix (bad config, bad data, missing files)."""


class ConfigError(ClpRayError):
    """The configuration is invalid; the message names the key path and the file it came from."""


class DataError(ClpRayError):
    """Input data is missing or malformed; the message names the file and line."""


class JobInterrupted(ClpRayError):
    """The job was stopped (Ctrl+C) with its state saved; re-running the same command resumes it.
    Jobs exit 130 for it, as for an interrupt."""
