"""Errors the tool reports to users as one line, with a stable exit code."""
from __future__ import annotations


class OptimizeError(Exception):
    """A problem with the user's input or environment: one clear line, exit code 2."""

    exit_code = 2


class ValidationFailed(Exception):
    """The optimized model does not match the original: exit code 1, nothing written."""

    exit_code = 1

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report
