"""How the bench scripts summarise what they measured."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> str:
    """Median, 95th percentile and maximum of seconds."""
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    median = statistics.median(ordered)
    return f"p50 {median:.2f} s, p95 {p95:.2f} s, max {ordered[-1]:.2f} s (n={len(ordered)})"
