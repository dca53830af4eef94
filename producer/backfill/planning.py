"""Planning one photo: its job request, output name and fingerprint, and whether it needs a
job at all.

Output names: `<output prefix>/<key under the source>`, the extension swapped for the
output format's when the photo already has that one (`cat.png` → `cat.png`), else appended
(`cat.jpg` → `cat.jpg.png`): `cat.jpg` and `cat.png` in one folder never map to one output,
whatever chunk or run each lands in, and the name alone says which photo an output came from.

Skipping: a job's fingerprint hashes what determines its output (input location and ETag,
effect, parameters, model, output location). A photo is skipped when its fingerprint is that
of its output's latest job and that job succeeded, is still in flight, or failed for a reason
in the photo itself (PHOTO_FAILURES: the same bytes would fail again); after other failures
(access, storage, a lost worker), a cancel, or a change (a new ETag or parameters: a new
fingerprint) it is processed again, by a new job: the earlier jobs stay as the output's
history. Only the latest job counts: after runs with parameters A then B, a run with A again
reprocesses, since the output holds B's result.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from producer import jobs
from producer.backfill.source import Item
from producer.errors import InvalidRequest
from producer.formats import OutputFormat
from producer.models import JobStatus
from producer.request import JobRequest, Queue, parse_request
from producer.storage import join

log = logging.getLogger(__name__)

# Request fields that name one photo's locations: a backfill derives them per photo.
PER_PHOTO_FIELDS = ("input", "output", "mask_output", "mask", "idempotency_key")
# A photo is skipped when its output's latest job has its fingerprint and is in one of these.
SKIP_STATUSES = (JobStatus.SUCCEEDED.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
# Failures the same photo meets every time: a re-run records them done (failed) and skips.
PHOTO_FAILURES = ("invalid_image", "unsupported_format", "input_too_large", "no_subject")
PLACEHOLDER_INPUT = "s3://backfill/placeholder"


@dataclass(frozen=True)
class Planned:
    request: JobRequest
    item: Item
    fingerprint: str


def template_request(options: dict[str, Any]) -> JobRequest:
    """Validate a backfill's job options once, as a request for a placeholder photo."""
    given = sorted(name for name in PER_PHOTO_FIELDS if options.get(name) is not None)
    if given:
        raise InvalidRequest(f"a backfill derives {', '.join(given)} per photo; leave them out")
    if options.get("queue") not in (None, Queue.BULK.value):
        raise InvalidRequest("backfills always use the bulk queue")
    return parse_request({**options, "input": PLACEHOLDER_INPUT, "queue": Queue.BULK.value})


def output_for(output_prefix: str, relative: str, fmt: str) -> str:
    """Deterministic per photo, so a re-run or resume never writes a second output for it;
    distinct per photo, so two photos never share one (see the module's docstring)."""
    extension = f".{OutputFormat(fmt).extension}"
    name = relative if PurePosixPath(relative).suffix == extension else relative + extension
    return join(output_prefix, name)


def fingerprint(request: JobRequest, etag: str, model: str) -> str:
    material = [request.input, etag, request.effect, request.params(), model, request.output]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def plan(template: JobRequest, item: Item, output_prefix: str, model: str) -> Planned:
    request = template.model_copy(
        update={
            "input": item.location,
            "output": output_for(output_prefix, item.relative, template.format),
        }
    )
    return Planned(request, item, fingerprint(request, item.etag, model))


def _done(run: jobs.Run | None, candidate: Planned) -> bool:
    """Whether the output's latest job already processed this photo as planned."""
    if run is None or run.fingerprint != candidate.fingerprint:
        return False
    if run.status in SKIP_STATUSES:
        return True
    return run.status == JobStatus.FAILED.value and run.error_code in PHOTO_FAILURES


def fresh(session: Session, planned: list[Planned]) -> list[tuple[Planned, jobs.Run | None]]:
    """Those not already processed nor in flight, each with its output's latest job (if any);
    a photo listed twice (a manifest) once. Of two photos naming one output (a manifest's
    `cat` and `cat.png`) the first is kept and the other skipped with a warning: one photo's
    output is never the other's."""
    if not planned:
        return []
    latest = jobs.latest_runs(session, [p.request.output or "" for p in planned])
    seen: set[str] = set()
    outputs: set[str | None] = set()
    kept = []
    for candidate in planned:
        run = latest.get(candidate.request.output or "")
        if candidate.fingerprint in seen or _done(run, candidate):
            continue
        if candidate.request.output in outputs:
            log.warning(
                "%s: output %s already belongs to another photo of this chunk; skipped",
                candidate.item.location,
                candidate.request.output,
            )
            continue
        seen.add(candidate.fingerprint)
        outputs.add(candidate.request.output)
        kept.append((candidate, run))
    return kept


def job_columns(backfill_id: str, planned: Planned) -> dict[str, Any]:
    return {
        "backfill_id": backfill_id,
        "input_etag": planned.item.etag,
        "fingerprint": planned.fingerprint,
    }


def by_output_owner(
    fresh: list[tuple[Planned, jobs.Run | None]],
) -> tuple[list[Planned], list[tuple[str, Planned]]]:
    """Split photos to process into new jobs (a new output) and (job id, photo) re-runs of
    the final backfill job that last wrote the output for this photo. An output whose latest
    job is in flight, was made by no backfill, or processed another photo (two names that map
    to one output in different chunks) is left alone (skipped)."""
    new: list[Planned] = []
    again: list[tuple[str, Planned]] = []
    for candidate, run in fresh:
        if run is None:
            new.append(candidate)
        elif (
            run.backfill_id is not None
            and JobStatus(run.status).final
            and run.input == candidate.request.input
        ):
            again.append((run.id, candidate))
        else:
            log.warning("%s: output held by job %s; skipped", candidate.item.location, run.id)
    return new, again
