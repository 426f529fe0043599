"""Errors a user is meant to read: each says where, what was expected and what to do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ParpkitError(Exception):
    """An error with a message written for the user; the CLI prints it without a traceback.

    The CLI exits 2 for it (refused: the input is wrong), unless it failed work that had started: a
    ``RunFailed``, or an error that stopped a run once its data and model had loaded and it began to evaluate,
    prune and train (the engine sets ``run_started``), exits 3. ``RecipeError``, ``PluginError`` and
    ``UsageError`` exit 2 wherever they are raised."""

    #: set by the engine on an error that stopped a run after its data and model loaded
    run_started: bool = False


class RecipeError(ParpkitError):
    """A recipe problem, located by file and dotted key path."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(ParpkitError):
    """A plugin could not be registered or found."""


class UsageError(ParpkitError):
    """A command line asks for what cannot be done (``--resume`` where there is nothing to resume, an empty
    ``--output-dir``): fix the command, as for a recipe error."""


class RunFailed(ParpkitError):
    """Work that had started did not finish: points of a sweep failed (each is named)."""


class ModelFormatError(ParpkitError):
    """A model file or directory is missing, truncated or not what it claims to be."""


class RunDirBusy(ParpkitError):
    """Another process holds the run directory's lock (a sweep skips such a point: someone else runs it)."""


def refused(exc: BaseException) -> bool:
    """Whether an error refused a command before anything ran (the input is wrong: exit 2), as opposed to
    failing work that had started (exit 3): see ``parpkit.cli.ExitCode``."""
    if isinstance(exc, (RecipeError, PluginError, UsageError)):
        return True
    return not (isinstance(exc, RunFailed) or getattr(exc, "run_started", False))


def located(file: str, key: str, check: Callable[[], Any]) -> Any:
    """Run a plugin's check; its error (ParpkitError or ValueError) names the recipe file and key."""
    try:
        return check()
    except RecipeError:
        raise
    except (ParpkitError, ValueError) as exc:
        raise RecipeError(str(exc), file=file, key=key) from None
