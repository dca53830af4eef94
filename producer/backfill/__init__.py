"""Backfills: one job per photo under a prefix (or in a manifest), into the `bulk` queue.

- `source`: the photos, listed in a fixed order in chunks (a resume starts after a cursor);
- `planning`: each photo's request, output name and fingerprint, and whether it needs a job;
- `records`: the backfill's row, its counters and guarded status changes;
- `engine`: `BackfillRunner`, which creates, runs, pauses and cancels backfills.
"""

from producer.backfill.engine import MAX_IN_FLIGHT, BackfillRunner

__all__ = ["MAX_IN_FLIGHT", "BackfillRunner"]
