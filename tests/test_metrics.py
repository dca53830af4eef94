"""Prometheus metrics: the API's /metrics moves with the traffic and the job store; the
worker's helpers record into the default registry and are served over HTTP."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, event

from producer.metrics import (
    ScrapeCollector,
    job_in_flight,
    record_batch,
    record_job,
    start_worker_metrics_server,
)
from tests.support.api import AUTH, TOKEN, api_app, api_settings, location
from tests.support.polling import poll_until


def scrape(http: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.integration
def test_the_api_metrics_follow_submissions_requests_and_the_job_store(
    db_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    with TestClient(api_app(api_settings(db_url, root, api_metrics_refresh_s=0))) as http:
        before = scrape(http)
        assert value(before, "backdrop_jobs", queue="bulk", status="queued") == 0
        body = [
            {"input": location(root, "a.png")},
            {"input": location(root, "b.png"), "queue": "bulk"},
        ]
        assert http.post("/v1/jobs", json=body, headers=AUTH).status_code == 202
        assert http.get("/v1/jobs").status_code == 401
        after = scrape(http)
    assert value(after, "backdrop_api_jobs_submitted_total", queue="bulk") == 1
    assert value(after, "backdrop_api_jobs_submitted_total", queue="interactive") == 1
    assert value(after, "backdrop_jobs", queue="bulk", status="queued") == 1
    assert value(after, "backdrop_jobs", queue="interactive", status="queued") == 1
    assert value(after, "backdrop_queue_depth", queue="bulk") == 1
    posted = {"method": "POST", "route": "/v1/jobs", "status": "202"}
    refused = {"method": "GET", "route": "/v1/jobs", "status": "401"}
    assert value(after, "backdrop_api_requests_total", **posted) == 1
    assert value(after, "backdrop_api_requests_total", **refused) == 1
    latency = {"method": "POST", "route": "/v1/jobs"}
    assert value(after, "backdrop_api_request_seconds_count", **latency) == 1


def test_requests_are_labelled_by_route_template_not_by_job_id(db_url: str, tmp_path: Path) -> None:
    settings = api_settings(db_url, tmp_path, broker_url="filesystem://", api_tokens=[TOKEN])
    with TestClient(api_app(settings)) as http:
        for job_id in ("one", "two"):
            http.get(f"/v1/jobs/{job_id}", headers=AUTH)
        http.get("/no/such/route")
        samples = scrape(http)
    by_template = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    assert value(samples, "backdrop_api_requests_total", **by_template) == 2
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(samples, "backdrop_api_requests_total", **unmatched) == 1


@pytest.mark.integration
def test_scrapes_within_the_refresh_interval_share_one_count_of_the_jobs_table(
    db_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    settings = api_settings(db_url, root, api_metrics_refresh_s=3600, api_rate_limit_per_s=0)
    aggregates: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "GROUP BY jobs.queue" in statement:
            aggregates.append(statement)

    # Every engine: the API's sessions may hold one that get_engine's cache has let go of.
    event.listen(Engine, "before_cursor_execute", count)
    try:
        with TestClient(api_app(settings)) as http:
            first = scrape(http)
            assert http.post("/v1/jobs", json={"input": location(root)}, headers=AUTH).is_success
            scrapes = [scrape(http) for _ in range(200)]
    finally:
        event.remove(Engine, "before_cursor_execute", count)
    assert len(aggregates) == 1
    # The counts are the first scrape's until the interval is over; the request counters
    # are live.
    queued = {"queue": "interactive", "status": "queued"}
    assert value(scrapes[-1], "backdrop_jobs", **queued) == value(first, "backdrop_jobs", **queued)
    posted = {"method": "POST", "route": "/v1/jobs", "status": "202"}
    assert value(scrapes[-1], "backdrop_api_requests_total", **posted) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_store_is_read_again_once_the_refresh_interval_is_over() -> None:
    clock, reads = Clock(), []

    def read() -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        reads.append(clock.now)
        return {"bulk": {"queued": len(reads)}}, {"bulk": 0}

    collector = ScrapeCollector(read, max_age_s=5, clock=clock)
    assert collector.reading() == ({"bulk": {"queued": 1}}, {"bulk": 0})
    clock.now += 4.9
    assert collector.reading() == ({"bulk": {"queued": 1}}, {"bulk": 0})
    clock.now += 0.1
    assert collector.reading() == ({"bulk": {"queued": 2}}, {"bulk": 0})
    assert reads == [1000.0, 1005.0]


def test_a_failing_store_is_not_asked_again_before_the_interval_is_over() -> None:
    clock, reads = Clock(), []

    def read() -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        reads.append(clock.now)
        raise ConnectionError("database down")

    collector = ScrapeCollector(read, max_age_s=5, clock=clock)
    families = {family.name: family for family in collector.collect()}
    assert set(families) == {"backdrop_jobs", "backdrop_queue_depth"}
    assert all(not family.samples for family in families.values())
    collector.collect()
    clock.now += 5
    collector.collect()
    assert reads == [1000.0, 1005.0]


def registry_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_recording_a_job_counts_its_outcome_and_observes_its_stages() -> None:
    done = {"outcome": "failed", "code": "invalid_image"}
    finished_before = registry_value("backdrop_worker_jobs_finished_total", **done)
    segment_before = registry_value("backdrop_worker_stage_seconds_count", stage="segment")
    sum_before = registry_value("backdrop_worker_stage_seconds_sum", stage="segment")
    fast_before = registry_value("backdrop_worker_stage_seconds_bucket", stage="segment", le="0.25")
    record_job("failed", "invalid_image", {"segment": 200.0, "decode": 50.0})
    assert registry_value("backdrop_worker_jobs_finished_total", **done) == finished_before + 1
    assert (
        registry_value("backdrop_worker_stage_seconds_count", stage="segment") == segment_before + 1
    )
    assert registry_value("backdrop_worker_stage_seconds_sum", stage="segment") == pytest.approx(
        sum_before + 0.2
    )
    assert (
        registry_value("backdrop_worker_stage_seconds_bucket", stage="segment", le="0.25")
        == fast_before + 1
    )


def test_a_batch_size_lands_in_its_bucket() -> None:
    up_to_8 = registry_value("backdrop_worker_batch_size_bucket", le="8.0")
    up_to_4 = registry_value("backdrop_worker_batch_size_bucket", le="4.0")
    record_batch(5)
    assert registry_value("backdrop_worker_batch_size_bucket", le="8.0") == up_to_8 + 1
    assert registry_value("backdrop_worker_batch_size_bucket", le="4.0") == up_to_4


def test_the_in_flight_gauge_drops_even_when_a_job_raises() -> None:
    start = registry_value("backdrop_worker_jobs_in_flight")
    with pytest.raises(RuntimeError), job_in_flight():
        assert registry_value("backdrop_worker_jobs_in_flight") == start + 1
        raise RuntimeError("the job blew up")
    assert registry_value("backdrop_worker_jobs_in_flight") == start


def test_the_worker_metrics_server_serves_the_worker_metrics() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start_worker_metrics_server(port)
    record_batch(3)
    bodies: list[str] = []

    def served() -> bool:
        try:
            bodies.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
        except httpx.TransportError:
            return False
        return True

    poll_until(served, timeout=10, what="the worker metrics server")
    assert "backdrop_worker_batch_size_bucket" in bodies[-1]
    assert "backdrop_worker_jobs_in_flight" in bodies[-1]
