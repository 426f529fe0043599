"""Progress reporting for long work (synthesis, training, evaluation), on stderr through rich."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Task:
    def __init__(self, bar: _RichProgress | None, task_id: int | None):
        self._bar, self._id = bar, task_id

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._id, n)

    def update(self, **fields) -> None:
        if self._bar is not None:
            self._bar.update(self._id, **fields)


class Progress:
    """``with progress.task("synthesising", total=n) as t: t.advance()``. Silent when disabled."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if not self.enabled:
            yield Task(None, None)
            return
        bar = _RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console)
        with bar:
            task_id = bar.add_task(description, total=total, info="")
            yield Task(bar, task_id)


QUIET = Progress(enabled=False)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """No progress bars from the libraries parpkit calls (transformers loading and writing weights,
    huggingface_hub downloads, datasets' map) while the context lasts; then each as it was. A run without
    progress (``--quiet``, ``progress=False``) runs inside it: quiet means quiet."""
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    was = (hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled(), datasets.is_progress_bar_enabled())
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            hf_logging.enable_progress_bar()
        if was[1]:
            hub.enable_progress_bars()
        if was[2]:
            datasets.enable_progress_bars()
