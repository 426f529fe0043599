"""Sparsity ramps for schedule authors: ``t`` runs from 0 (start of the ramp) to 1 (its end); values of
``t`` outside [0, 1] are clamped, so a ramp holds its end value after it."""

from __future__ import annotations


def linear_ramp(start: float, end: float, t: float) -> float:
    """Equal steps from ``start`` to ``end`` (the reference PARP-P code's rule)."""
    t = min(1.0, max(0.0, t))
    return start + (end - start) * t


def cubic_ramp(start: float, end: float, t: float) -> float:
    """Zhu & Gupta 2017: s_t = s_f + (s_i - s_f)(1 - t)³, fast at first, slow near the end."""
    t = min(1.0, max(0.0, t))
    return end + (start - end) * (1 - t) ** 3
