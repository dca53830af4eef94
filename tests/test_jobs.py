"""The job store: creation, idempotency and guarded status changes, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from producer import jobs
from producer.db import session_scope
from producer.errors import InvalidRequest, InvalidTransition, JobNotFound, OutputExists
from producer.models import Job, JobStatus
from producer.request import JobRequest, parse_request

if TYPE_CHECKING:
    from alembic.config import Config

PREFIX = "s3://out/results"


def _request(**fields: object) -> JobRequest:
    return JobRequest(input="s3://inputs/photo.jpg", **fields)


def _create(url: str, *requests: JobRequest) -> list[jobs.Created]:
    with session_scope(url) as session:
        return jobs.create(session, list(requests), PREFIX)


def _start(url: str, job_id: str, lease_s: float = 60) -> int:
    with session_scope(url) as session:
        job = jobs.start(session, job_id, "worker-a", lease_s)
        assert job is not None
        return job.attempts


def _succeed(url: str, job_id: str, attempt: int) -> bool:
    with session_scope(url) as session:
        return jobs.succeed(
            session,
            job_id,
            attempt,
            model_name="deeplabv3_resnet101",
            model_weights="w@sha256:abc",
            timings_ms={"segment": 1.0},
            input_size=(640, 480),
            foreground_fraction=0.25,
        )


def _status(url: str, job_id: str) -> str:
    with session_scope(url) as session:
        return jobs.get(session, job_id).status


def test_created_jobs_are_queued_with_a_default_output_under_the_prefix(db_url: str) -> None:
    (created,) = _create(db_url, _request(format="webp"))
    record = created.job.to_record()
    assert created.new
    assert record["status"] == "queued"
    assert record["output"] == f"{PREFIX}/{record['id']}.webp"
    assert record["params"]["format"] == "webp"
    assert record["attempts"] == 0 and record["error"] is None


def test_many_requests_become_many_jobs_in_order(db_url: str) -> None:
    requests = [_request(output=f"s3://out/{i}.png") for i in range(2500)]
    created = _create(db_url, *requests)
    assert [c.job.output for c in created] == [f"s3://out/{i}.png" for i in range(2500)]
    assert len({c.job.id for c in created}) == 2500


def test_resubmitting_an_idempotency_key_returns_the_existing_job(db_url: str) -> None:
    (first,) = _create(db_url, _request(idempotency_key="upload-42"))
    second, other = _create(db_url, _request(idempotency_key="upload-42"), _request())
    assert second.job.id == first.job.id and not second.new
    assert other.new and other.job.id != first.job.id


def test_a_job_runs_and_succeeds_with_a_complete_record(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    attempt = _start(db_url, created.job.id)
    assert _succeed(db_url, created.job.id, attempt)
    with session_scope(db_url) as session:
        record = jobs.get(session, created.job.id).to_record()
    assert record["status"] == "succeeded"
    assert record["input_size"] == [640, 480]
    assert record["model"] == {"name": "deeplabv3_resnet101", "weights": "w@sha256:abc"}
    assert record["worker"] == "worker-a"
    assert record["started_at"] and record["finished_at"]


def test_a_finished_job_is_never_moved_back_by_a_late_delivery(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    attempt = _start(db_url, created.job.id)
    assert _succeed(db_url, created.job.id, attempt)
    with session_scope(db_url) as session:
        assert jobs.start(session, created.job.id, "worker-b", 60) is None
        assert not jobs.fail(session, created.job.id, attempt, "internal", "late")
    assert _status(db_url, created.job.id) == JobStatus.SUCCEEDED


def test_a_stale_attempt_cannot_finish_a_job_a_newer_attempt_owns(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    stale = _start(db_url, created.job.id, lease_s=-1)  # its worker vanished: lease ran out
    fresh = _start(db_url, created.job.id)
    assert fresh == stale + 1
    assert not _succeed(db_url, created.job.id, stale)
    assert _succeed(db_url, created.job.id, fresh)


def test_failing_records_the_error_code_and_message(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    attempt = _start(db_url, created.job.id)
    with session_scope(db_url) as session:
        assert jobs.fail(session, created.job.id, attempt, "invalid_image", "truncated JPEG")
        record = jobs.get(session, created.job.id).to_record()
    assert record["status"] == "failed"
    assert record["error"] == {"code": "invalid_image", "message": "truncated JPEG"}


def test_a_failed_job_can_be_retried_and_then_succeed(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    attempt = _start(db_url, created.job.id)
    with session_scope(db_url) as session:
        jobs.fail(session, created.job.id, attempt, "input_not_found", "missing")
        retried = jobs.retry(session, created.job.id)
    assert retried.status == "queued" and retried.error_code is None and retried.attempts == 0
    assert _succeed(db_url, created.job.id, _start(db_url, created.job.id))


def test_only_failed_jobs_can_be_retried(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    with session_scope(db_url) as session, pytest.raises(InvalidTransition, match="queued"):
        jobs.retry(session, created.job.id)


def test_a_queued_job_can_be_canceled_and_then_never_runs(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    with session_scope(db_url) as session:
        assert jobs.cancel(session, created.job.id).status == "canceled"
        assert jobs.start(session, created.job.id, "worker-a", 60) is None


def test_a_running_job_cannot_be_canceled(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    _start(db_url, created.job.id)
    with session_scope(db_url) as session, pytest.raises(InvalidTransition, match="running"):
        jobs.cancel(session, created.job.id)


def test_an_unknown_job_id_is_reported_as_not_found(db_url: str) -> None:
    with session_scope(db_url) as session, pytest.raises(JobNotFound):
        jobs.get(session, "00000000-0000-0000-0000-000000000000")


def test_listing_pages_newest_first_and_filters_by_status(db_url: str) -> None:
    created = _create(db_url, *[_request() for _ in range(5)])
    _start(db_url, created[0].job.id)
    with session_scope(db_url) as session:
        first_page = jobs.listing(session, limit=3)
        last = first_page[-1]
        second_page = jobs.listing(session, limit=3, before=(last.created_at, last.id))
        running = jobs.listing(session, status="running")
    ids = [j.id for j in first_page + second_page]
    assert sorted(ids) == sorted(c.job.id for c in created)
    assert [j.id for j in running] == [created[0].job.id]


def test_a_duplicate_delivery_cannot_take_a_job_from_a_live_attempt(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    _start(db_url, created.job.id)
    with session_scope(db_url) as session:
        assert jobs.start(session, created.job.id, "worker-b", 60) is None
        assert jobs.get(session, created.job.id).worker == "worker-a"


def test_a_transient_failure_releases_the_job_back_to_queued_with_its_reason(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    attempt = _start(db_url, created.job.id)
    with session_scope(db_url) as session:
        assert jobs.release(session, created.job.id, attempt, "storage_unavailable", "503")
        job = jobs.get(session, created.job.id)
    assert job.status == "queued" and job.error_code == "storage_unavailable"
    assert _succeed(db_url, created.job.id, _start(db_url, created.job.id))


def test_the_reaper_requeues_expired_leases_and_fails_poison_jobs_as_worker_lost(
    db_url: str,
) -> None:
    alive, dead, poison = (c.job.id for c in _create(db_url, *[_request() for _ in range(3)]))
    _start(db_url, alive)
    _start(db_url, dead, lease_s=-1)
    for _ in range(3):
        _start(db_url, poison, lease_s=-1)
    with session_scope(db_url) as session:
        reaped = jobs.reap(session, max_attempts=3)
    assert reaped.requeued == [(dead, "interactive")]
    assert reaped.lost == [poison]
    assert _status(db_url, alive) == "running"
    assert _status(db_url, dead) == "queued"
    with session_scope(db_url) as session:
        record = jobs.get(session, poison).to_record()
    assert record["status"] == "failed" and record["error"]["code"] == "worker_lost"


def test_renewing_keeps_only_the_leases_the_worker_still_owns(db_url: str) -> None:
    mine, stolen = (c.job.id for c in _create(db_url, _request(), _request()))
    my_attempt = _start(db_url, mine, lease_s=-1)
    old_attempt = _start(db_url, stolen, lease_s=-1)
    _start(db_url, stolen)  # another worker took it over
    with session_scope(db_url) as session:
        assert jobs.renew(session, [(mine, my_attempt), (stolen, old_attempt)], 60) == 1
        assert jobs.reap(session, max_attempts=5).requeued == []


def test_many_jobs_are_looked_up_in_the_order_asked_and_a_missing_one_is_named(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "STATEMENT_CHUNK", 2)  # several statements, stitched in order
    created = _create(db_url, *(_request(output=f"s3://out/{i}.png") for i in range(5)))
    ids = [c.job.id for c in reversed(created)]
    with session_scope(db_url) as session:
        assert [job.id for job in jobs.get_many(session, ids)] == ids
        with pytest.raises(JobNotFound, match="no job with id nope"):
            jobs.get_many(session, [ids[0], "nope"])


# --- outputs: one job per location, and only its own objects replaced -----------------


def test_two_jobs_whose_outputs_are_aliases_conflict(db_url: str, tmp_path: Path) -> None:
    root = tmp_path.as_uri()
    (first,) = _create(db_url, _request(output=f"{root}/out/photo.png"))
    for alias in ("out/./photo.png", "out//photo.png", "out/%70hoto.png", "./out/photo.png"):
        with pytest.raises(InvalidRequest, match="already belongs to another job"):
            _create(
                db_url, parse_request({"input": "s3://inputs/a.jpg", "output": f"{root}/{alias}"})
            )
    assert first.job.output == f"{root}/out/photo.png"


def test_a_symlinked_folder_is_the_folder_it_points_to(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out", target_is_directory=True)
    _create(db_url, _request(output=(tmp_path / "out" / "photo.png").as_uri()))
    with pytest.raises(InvalidRequest, match="already belongs to another job"):
        _create(db_url, _request(output=(tmp_path / "link" / "photo.png").as_uri()))


def test_no_job_writes_where_another_job_writes_its_mask_or_output(db_url: str) -> None:
    _create(db_url, _request(output="s3://outputs/a.png", mask_output="s3://outputs/a-mask.png"))
    for fields in (
        {"output": "s3://outputs/a-mask.png"},
        {"output": "s3://outputs/b.png", "mask_output": "s3://outputs/a.png"},
        {"output": "s3://outputs/b.png", "mask_output": "s3://outputs/a-mask.png"},
    ):
        with pytest.raises(InvalidRequest, match="already belongs to another job"):
            _create(db_url, _request(**fields))
    with pytest.raises(InvalidRequest, match="named twice"):
        _create(
            db_url,
            _request(output="s3://outputs/c.png"),
            _request(output="s3://outputs/d.png", mask_output="s3://outputs/c.png"),
        )


def test_default_outputs_are_canonical_under_a_prefix_spelled_otherwise(
    db_url: str, tmp_path: Path
) -> None:
    with session_scope(db_url) as session:
        (created,) = jobs.create(session, [_request()], f"{tmp_path.as_uri()}//out/./")
    assert created.job.output == f"{(tmp_path / 'out').as_uri()}/{created.job.id}.png"


def _job(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        return jobs.get(session, job_id)


def test_an_existing_object_the_job_did_not_write_is_not_replaced(db_url: str) -> None:
    (created,) = _create(db_url, _request(output="s3://outputs/taken.png"))
    _start(db_url, created.job.id)
    job = _job(db_url, created.job.id)
    with pytest.raises(OutputExists, match="overwrite"):
        jobs.check_overwrite(job, overwrite=False, exists=lambda location: True)
    jobs.check_overwrite(job, overwrite=True, exists=lambda location: True)
    jobs.check_overwrite(job, overwrite=False, exists=lambda location: False)


def test_an_existing_mask_the_job_did_not_write_is_not_replaced(db_url: str) -> None:
    (created,) = _create(db_url, _request(mask_output="s3://outputs/mask.png"))
    _start(db_url, created.job.id)
    job = _job(db_url, created.job.id)
    with pytest.raises(OutputExists, match=r"mask\.png"):
        jobs.check_overwrite(job, overwrite=False, exists=lambda location: "mask" in location)


def test_a_retry_may_rewrite_what_an_earlier_attempt_wrote(db_url: str) -> None:
    (created,) = _create(db_url, _request(mask_output="s3://outputs/mask.png"))
    attempt = _start(db_url, created.job.id)
    with session_scope(db_url) as session:
        assert jobs.own_outputs(session, created.job.id, attempt)
        jobs.fail(session, created.job.id, attempt, "storage_unavailable", "gone")
        jobs.retry(session, created.job.id)
    _start(db_url, created.job.id)
    job = _job(db_url, created.job.id)
    assert job.owns_output and job.owns_mask
    jobs.check_overwrite(job, overwrite=False, exists=lambda location: True)


def test_a_stale_attempt_cannot_claim_the_outputs(db_url: str) -> None:
    (created,) = _create(db_url, _request())
    stale = _start(db_url, created.job.id, lease_s=-1)
    _start(db_url, created.job.id)
    with session_scope(db_url) as session:
        assert not jobs.own_outputs(session, created.job.id, stale)


# --- history: re-runs of an output -----------------------------------------------------------


def _rerun(url: str, earlier: str, request: JobRequest, **extra: object) -> Job:
    with session_scope(url) as session:
        (job,) = jobs.rerun(session, [earlier], [request], extras=[extra])
        return job


def _finished(url: str, request: JobRequest) -> str:
    """A job that ran `request` to success, having written its outputs."""
    (created,) = _create(url, request)
    attempt = _start(url, created.job.id)
    with session_scope(url) as session:
        jobs.own_outputs(session, created.job.id, attempt)
    assert _succeed(url, created.job.id, attempt)
    return created.job.id


def test_a_re_run_is_a_new_job_and_the_earlier_record_stays_as_it_was(db_url: str) -> None:
    output = "s3://outputs/history.png"
    first = _finished(db_url, _request(output=output, effect="blur", blur_strength=0.3))
    before = _job(db_url, first).to_record()

    second = _rerun(db_url, first, _request(output=output, effect="blur", blur_strength=0.6))

    assert second.id != first and second.status == "queued"
    assert second.params["blur_strength"] == 0.6
    assert _job(db_url, first).to_record() == before
    with session_scope(db_url) as session:
        runs = jobs.listing(session, output=output)
    assert [job.id for job in runs] == [second.id, first]


def test_a_re_run_may_replace_the_output_an_earlier_run_wrote(db_url: str) -> None:
    output, mask = "s3://outputs/owned.png", "s3://outputs/owned-mask.png"
    first = _finished(db_url, _request(output=output, mask_output=mask))

    same = _rerun(db_url, first, _request(output=output, mask_output=mask, effect="blur"))
    _start(db_url, same.id)

    job = _job(db_url, same.id)
    assert job.owns_output and job.owns_mask
    jobs.check_overwrite(job, overwrite=False, exists=lambda location: True)


def test_a_re_run_with_a_new_mask_location_does_not_own_it_yet(db_url: str) -> None:
    output = "s3://outputs/moved.png"
    first = _finished(db_url, _request(output=output, mask_output="s3://outputs/m1.png"))

    moved = _rerun(db_url, first, _request(output=output, mask_output="s3://outputs/m2.png"))

    assert moved.owns_output and not moved.owns_mask
    with pytest.raises(OutputExists, match=r"m2\.png"):
        jobs.check_overwrite(moved, overwrite=False, exists=lambda location: True)


def test_a_re_run_of_a_job_that_never_wrote_its_output_does_not_own_it(db_url: str) -> None:
    (created,) = _create(db_url, _request(output="s3://outputs/never.png"))
    with session_scope(db_url) as session:
        jobs.cancel(session, created.job.id)

    again = _rerun(db_url, created.job.id, _request(output="s3://outputs/never.png"))

    assert not again.owns_output
    with pytest.raises(OutputExists):
        jobs.check_overwrite(again, overwrite=False, exists=lambda location: True)


def test_two_unfinished_jobs_for_one_output_are_refused(db_url: str) -> None:
    output = "s3://outputs/busy.png"
    (queued,) = _create(db_url, _request(output=output))

    with pytest.raises(InvalidRequest, match="not finished"):
        _rerun(db_url, queued.job.id, _request(output=output, effect="blur"))
    first = _finished(db_url, _request(output="s3://outputs/busy-2.png"))
    _rerun(db_url, first, _request(output="s3://outputs/busy-2.png", effect="blur"))
    with pytest.raises(InvalidRequest, match="not finished"):
        _rerun(db_url, first, _request(output="s3://outputs/busy-2.png", effect="desaturate"))

    with session_scope(db_url) as session:
        assert len(jobs.listing(session, output=output)) == 1
        assert len(jobs.listing(session, output="s3://outputs/busy-2.png")) == 2


def test_the_database_itself_refuses_a_second_unfinished_job_for_an_output(db_url: str) -> None:
    (queued,) = _create(db_url, _request(output="s3://outputs/indexed.png"))
    copy = (
        "INSERT INTO jobs (id, status, queue, input, output, effect, params, attempts, "
        "created_at, owns_output, owns_mask, callback_tries) SELECT :id, status, queue, input, "
        "output, effect, params, 0, created_at, false, false, 0 FROM jobs WHERE id = :source"
    )
    with pytest.raises(IntegrityError), session_scope(db_url) as session:
        session.execute(text(copy), {"id": "second", "source": queued.job.id})


def test_a_finished_run_does_not_block_the_next_one(db_url: str) -> None:
    output = "s3://outputs/series.png"
    first = _finished(db_url, _request(output=output))
    second = _rerun(db_url, first, _request(output=output, effect="blur"))
    _succeed(db_url, second.id, _start(db_url, second.id))

    third = _rerun(db_url, second.id, _request(output=output, effect="desaturate"))

    with session_scope(db_url) as session:
        runs = jobs.listing(session, output=output)
    assert [job.id for job in runs] == [third.id, second.id, first]
    assert [job.status for job in runs] == ["queued", "succeeded", "succeeded"]


def test_only_the_latest_run_of_an_output_can_be_retried(db_url: str) -> None:
    output = "s3://outputs/retried.png"
    (created,) = _create(db_url, _request(output=output))
    attempt = _start(db_url, created.job.id)
    with session_scope(db_url) as session:
        jobs.fail(session, created.job.id, attempt, "storage_unavailable", "gone")
    later = _rerun(db_url, created.job.id, _request(output=output, effect="blur"))
    with session_scope(db_url) as session:
        jobs.fail(session, later.id, _start(db_url, later.id), "storage_unavailable", "gone")

    with session_scope(db_url) as session:
        assert jobs.failed_ids(session) == [later.id]
        with pytest.raises(InvalidTransition, match="run again"):
            jobs.retry(session, created.job.id)
        assert jobs.retry(session, later.id).status == "queued"


def _alembic(url: str) -> Config:
    from alembic.config import Config

    from producer.db import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    return config


def test_the_migration_gives_succeeded_jobs_their_outputs(tmp_path: Path) -> None:
    from alembic import command

    from producer.db import get_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = _alembic(url)
    command.upgrade(config, "0003")
    with get_engine(url).begin() as connection:
        for job_id, status, mask in (("a", "succeeded", "s3://o/a-m.png"), ("b", "failed", None)):
            connection.execute(
                text(
                    "INSERT INTO jobs (id, status, queue, input, output, mask_output, effect, "
                    "params, attempts, created_at) VALUES (:id, :status, 'bulk', 's3://i/x', "
                    ":output, :mask, 'remove', '{}', 1, '2026-01-01')"
                ),
                {"id": job_id, "status": status, "output": f"s3://o/{job_id}.png", "mask": mask},
            )
    command.upgrade(config, "head")
    assert (_job(url, "a").owns_output, _job(url, "a").owns_mask) == (True, True)
    assert (_job(url, "b").owns_output, _job(url, "b").owns_mask) == (False, False)


def test_downgrading_past_job_history_keeps_one_job_per_output(own_db_url: str) -> None:
    from alembic import command

    from producer.db import get_engine

    # Per output, in the order the downgrade keeps them: unfinished, owner, newest.
    runs = {
        "live": [("live-old", "succeeded", True, 1), ("live-now", "queued", False, 2)],
        "owned": [("owner", "succeeded", True, 1), ("owned-later", "failed", False, 3)],
        "newest": [("first", "failed", False, 1), ("second", "canceled", False, 4)],
        "single": [("alone", "failed", False, 1)],
    }
    with get_engine(own_db_url).begin() as connection:
        for output, jobs_of_output in runs.items():
            for job_id, status, owns, day in jobs_of_output:
                connection.execute(
                    text(
                        "INSERT INTO jobs (id, status, queue, input, output, effect, params, "
                        "attempts, created_at, owns_output) VALUES (:id, :status, 'bulk', "
                        "'s3://i/x', :output, 'remove', '{}', 1, :created, :owns)"
                    ),
                    {
                        "id": job_id,
                        "status": status,
                        "output": f"s3://o/{output}.png",
                        "created": f"2026-01-0{day} 00:00:00+00:00",
                        "owns": owns,
                    },
                )
                connection.execute(
                    text(
                        "INSERT INTO callback_attempts (job_id, at, duration_ms) "
                        "VALUES (:id, '2026-01-09 00:00:00+00:00', 1)"
                    ),
                    {"id": job_id},
                )

    config = _alembic(own_db_url)
    command.downgrade(config, "0005")

    with get_engine(own_db_url).begin() as connection:
        kept = connection.execute(text("SELECT output, id FROM jobs ORDER BY output"))
        attempts = connection.execute(text("SELECT job_id FROM callback_attempts ORDER BY job_id"))
        assert dict(kept.all()) == {
            "s3://o/live.png": "live-now",
            "s3://o/newest.png": "second",
            "s3://o/owned.png": "owner",
            "s3://o/single.png": "alone",
        }
        assert attempts.scalars().all() == ["alone", "live-now", "owner", "second"]
        with pytest.raises(IntegrityError):  # 0005's one job per output holds again
            connection.execute(
                text(
                    "INSERT INTO jobs (id, status, queue, input, output, effect, params, "
                    "attempts, created_at) VALUES ('again', 'queued', 'bulk', 's3://i/x', "
                    "'s3://o/single.png', 'remove', '{}', 0, '2026-01-05 00:00:00+00:00')"
                )
            )
    command.upgrade(config, "head")


# --- bulk creation -------------------------------------------------------------------------


def test_a_bulk_body_becomes_one_row_per_job_whose_records_are_what_the_database_holds(
    db_url: str,
) -> None:
    requests = [
        _request(output=f"s3://out/bulk/{i}.png", idempotency_key=f"bulk-{i}" if i % 2 else None)
        for i in range(1200)
    ]
    created = _create(db_url, *requests)
    with session_scope(db_url) as session:
        assert session.scalar(text("SELECT count(*) FROM jobs")) == 1200
        stored = jobs.get_many(session, [c.job.id for c in created])
        assert [c.job.to_record() for c in created] == [job.to_record() for job in stored]
        defaults = ("owns_output", "owns_mask", "callback_tries", "attempts")
        assert {tuple(getattr(c.job, name) for name in defaults) for c in created} == {
            tuple(getattr(job, name) for name in defaults) for job in stored
        }
    assert all(c.new for c in created)


def test_an_idempotency_key_named_twice_in_one_body_makes_one_job(db_url: str) -> None:
    first, other, again = _create(
        db_url,
        _request(idempotency_key="twice", output="s3://out/twice-a.png"),
        _request(output="s3://out/other.png"),
        _request(idempotency_key="twice", output="s3://out/twice-b.png"),
    )
    assert first.new and other.new and not again.new
    assert again.job.id == first.job.id and again.job.output == "s3://out/twice-a.png"
    with session_scope(db_url) as session:
        assert session.scalar(text("SELECT count(*) FROM jobs")) == 2


def test_a_second_bulk_body_gets_the_jobs_of_its_known_keys_and_new_ones_for_the_rest(
    db_url: str,
) -> None:
    first = _create(db_url, *[_request(idempotency_key=f"k{i}") for i in range(300)])
    second = _create(db_url, *[_request(idempotency_key=f"k{i}") for i in range(200, 500)])
    assert [c.job.id for c in second[:100]] == [c.job.id for c in first[200:]]
    assert not any(c.new for c in second[:100]) and all(c.new for c in second[100:])
    with session_scope(db_url) as session:
        assert session.scalar(text("SELECT count(*) FROM jobs")) == 500


def test_a_bulk_body_naming_a_taken_output_is_refused_whole(db_url: str) -> None:
    _create(db_url, _request(output="s3://out/taken.png"))
    requests = [_request(output=f"s3://out/free-{i}.png") for i in range(500)]
    with pytest.raises(InvalidRequest, match="already belongs to another job"):
        _create(db_url, *requests, _request(output="s3://out/taken.png"))
    with pytest.raises(InvalidRequest, match="named twice"):
        _create(db_url, *requests, _request(output="s3://out/free-7.png"))
    with session_scope(db_url) as session:
        assert session.scalar(text("SELECT count(*) FROM jobs")) == 1


def test_a_concurrent_insert_of_a_taken_output_is_refused_by_the_unique_index(
    db_url: str,
) -> None:
    _create(db_url, _request(output="s3://out/raced.png"))
    with session_scope(db_url) as session:
        rows = [
            jobs._row(_request(output=f"s3://out/{name}.png"), PREFIX, jobs.now())
            for name in ("fresh", "raced")
        ]
        with pytest.raises(InvalidRequest, match="already belongs to another job"):
            jobs._insert(session, rows)
