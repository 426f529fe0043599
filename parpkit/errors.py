"""Errors a user is meant to read: each says where, what was expected and what to do."""

from __future__ import annotations


class ParpkitError(Exception):
    """An error with a message written for the user; the CLI prints it without a traceback."""


class RecipeError(ParpkitError):
    """A recipe problem, located by file and dotted key path."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(ParpkitError):
    """A plugin could not be registered or found."""


class ModelFormatError(ParpkitError):
    """A model file or directory is missing, truncated or not what it claims to be."""


class RunDirBusy(ParpkitError):
    """Another process holds the run directory's lock (a sweep skips such a point: someone else runs it)."""
