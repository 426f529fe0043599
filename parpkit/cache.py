"""Cache entries built in a temporary folder and renamed into place, so a killed build never leaves
a half-written entry under the real name, and two processes building the same entry both succeed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def install_atomically(tmp: Path, target: Path, is_valid: Callable[[Path], bool]) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing a damaged entry there."""
    if target.exists() and not is_valid(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_valid(target):  # not a concurrent build that finished first
            raise
