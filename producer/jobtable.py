"""Jobs as a plain-text table for a terminal: `backdrop jobs` and `backdrop demo` print it."""

from __future__ import annotations

from typing import Any


def format_table(records: list[dict[str, Any]], labels: list[str] | None = None) -> str:
    """One line per job; `labels` (one per record) replace the effect column's words."""
    shown = labels or [r["effect"] for r in records]
    width = max([10, *(len(label) for label in shown)])
    header = f"{'id':36}  {'status':9}  {'effect':{width}}  {'ms':>7}  {'error':24}  input"
    lines = [header, "-" * len(header)]
    for r, label in zip(records, shown, strict=True):
        total = sum((r["timings_ms"] or {}).values())
        error = (r["error"] or {}).get("code", "")
        lines.append(
            f"{r['id']:36}  {r['status']:9}  {label:{width}}  {total:7.0f}  {error:24}  "
            + r["input"]
        )
    return "\n".join(lines)
