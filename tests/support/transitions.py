"""Jobs driven through the worker's transitions (start, then succeed or fail) without a
worker: for tests about what records, stats and listings show once jobs have run."""

from __future__ import annotations

from producer import jobs
from producer.db import session_scope


def run_to_end(
    url: str,
    job_id: str,
    *,
    worker: str = "worker-test",
    error: tuple[str, str] | None = None,
    timings_ms: dict[str, float] | None = None,
    input_size: tuple[int, int] = (8, 8),
) -> None:
    """Start a queued job and finish it: succeeded, or failed with `error` (code, message)."""
    with session_scope(url) as session:
        attempt = jobs.start(session, job_id, worker, 60).attempts
    with session_scope(url) as session:
        if error:
            jobs.fail(session, job_id, attempt, *error)
        else:
            jobs.succeed(
                session,
                job_id,
                attempt,
                model_name="deeplabv3_resnet101",
                model_weights="w",
                timings_ms=timings_ms or {},
                input_size=input_size,
                foreground_fraction=0.5,
            )
