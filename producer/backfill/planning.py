"""Planning one photo: its job request, output name and fingerprint, and whether it needs a
job at all.

Output names: `<output prefix>/<key under the source>`, the extension swapped for the
output format's when the photo already has that one (`cat.png` → `cat.png`), else appended
(`cat.jpg` → `cat.jpg.png`): `cat.jpg` and `cat.png` in one folder never map to one output,
whatever chunk or run each lands in, and the name alone says which photo an output came from.

Skipping: a job's fingerprint hashes what determines its output (input location and ETag,
effect, parameters, model, output location). A photo whose fingerprint belongs to a job that
succeeded or is still in flight is skipped, and so is one that failed for a reason in the
photo itself (PHOTO_FAILURES: the same bytes would fail again); other failures (access,
storage, a lost worker) and canceled ones are processed again. A changed photo has a new
ETag, hence a new fingerprint, and is processed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from producer import jobs
from producer.backfill.source import Item
from producer.errors import InvalidRequest
from producer.models import Job, JobStatus
from producer.request import JobRequest, Queue, parse_request
from producer.storage import join

log = logging.getLogger(__name__)

# Request fields that name one photo's locations: a backfill derives them per photo.
PER_PHOTO_FIELDS = ("input", "output", "mask_output", "mask", "idempotency_key")
# A photo is skipped when a job with its fingerprint is in one of these.
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
    extension = f".{jobs.EXTENSIONS[fmt]}"
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


def _already_done(session: Session, planned: list[Planned]) -> set[str]:
    prints = [p.fingerprint for p in planned]
    query = select(Job.fingerprint).where(
        jobs.one_of(session, Job.fingerprint, prints),
        or_(
            Job.status.in_(SKIP_STATUSES),
            (Job.status == JobStatus.FAILED.value) & Job.error_code.in_(PHOTO_FAILURES),
        ),
    )
    return {value for value in session.scalars(query) if value is not None}


def fresh(session: Session, planned: list[Planned]) -> list[Planned]:
    """Those not already processed nor in flight; a photo listed twice (a manifest) once.
    Of two photos naming one output (a manifest's `cat` and `cat.png`) the first is kept
    and the other skipped with a warning: one photo's output is never the other's."""
    if not planned:
        return []
    done = _already_done(session, planned)
    outputs: set[str | None] = set()
    kept = []
    for candidate in planned:
        if candidate.fingerprint in done:
            continue
        if candidate.request.output in outputs:
            log.warning(
                "%s: output %s already belongs to another photo of this chunk; skipped",
                candidate.item.location,
                candidate.request.output,
            )
            continue
        done.add(candidate.fingerprint)
        outputs.add(candidate.request.output)
        kept.append(candidate)
    return kept


def job_columns(backfill_id: str, planned: Planned) -> dict[str, Any]:
    return {
        "backfill_id": backfill_id,
        "input_etag": planned.item.etag,
        "fingerprint": planned.fingerprint,
    }


def by_output_owner(
    session: Session, fresh: list[Planned]
) -> tuple[list[Planned], list[tuple[str, Planned]]]:
    """Split photos to process into new jobs and (job id, photo) for final backfill jobs that
    already own the output: an output has one job, so reprocessing requeues that job. An
    output held by a job in flight, by a job no backfill made, or by another photo's job (two
    names that map to one output in different chunks) is left alone (skipped)."""
    outputs = [p.request.output for p in fresh]
    owners = {
        row.output: row
        for row in session.execute(
            select(Job.id, Job.input, Job.output, Job.status, Job.backfill_id).where(
                jobs.one_of(session, Job.output, outputs)
            )
        )
    }
    new: list[Planned] = []
    adopt: list[tuple[str, Planned]] = []
    for candidate in fresh:
        owner = owners.get(candidate.request.output)
        if owner is None:
            new.append(candidate)
        elif (
            owner.backfill_id is not None
            and JobStatus(owner.status).final
            and owner.input == candidate.request.input
        ):
            adopt.append((owner.id, candidate))
        else:
            log.warning("%s: output held by job %s; skipped", candidate.item.location, owner.id)
    return new, adopt
