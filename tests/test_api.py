"""The HTTP API through FastAPI's TestClient, over a real database (SQLite and PostgreSQL)
and a real Redis broker. The TestClient re-raises server errors, so no test passes on a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from producer import jobs
from producer.api import ApiMisconfigured, create_app, decode_cursor
from producer.broker import QUEUE_NAMES
from producer.db import session_scope
from producer.settings import Settings
from tests.conftest import REDIS_TEST_URL, require_service
from tests.conftest import run_to_end as finish_job

pytestmark = pytest.mark.integration

TOKEN = "alpha-token-0123456789"
OTHER_TOKEN = "beta-token-9876543210"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def photo_root(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    return root


def redis_broker_url() -> str:
    """The test Redis with its queues emptied. Deliberately no FLUSHDB: kombu remembers the
    exchange bindings it declared for the whole process, so after a flush every later publish
    from this process would be dropped (reported on producer/broker.py)."""
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=3)
    try:
        client.delete(*QUEUE_NAMES)
        available = True
    except redis.RedisError:
        available = False
    require_service("Redis", available, REDIS_TEST_URL)
    return REDIS_TEST_URL


def api_settings(db_url: str, root: Path, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "database_url": db_url,
        "broker_url": overrides.pop("broker_url", None) or redis_broker_url(),
        "data_dir": root.parent / "data",
        "local_roots": [str(root)],
        "output_prefix": (root / "out").as_uri(),
        "api_tokens": [TOKEN, OTHER_TOKEN],
    }
    return Settings(**(fields | overrides))


@pytest.fixture
def settings(db_url: str, photo_root: Path) -> Settings:
    return api_settings(db_url, photo_root)


@pytest.fixture
def http(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def location(root: Path, name: str = "cat.png") -> str:
    return (root / name).as_uri()


def submit(http: TestClient, body: Any) -> Any:
    response = http.post("/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def redis_depth(settings: Settings, queue: str) -> int:
    return int(redis.Redis.from_url(settings.broker_url).llen(queue))


def run_to_end(settings: Settings, job_id: str, error_code: str | None = None) -> None:
    """Drive a job through the worker's transitions without a worker."""
    error = (error_code, f"{error_code} happened") if error_code else None
    finish_job(
        settings.database_url, job_id, error=error, timings_ms={"segment": 10.0}, input_size=(4, 3)
    )


def start(settings: Settings, job_id: str) -> None:
    with session_scope(settings.database_url) as session:
        jobs.start(session, job_id, "worker-test", 60)


# --- submitting ----------------------------------------------------------------------------


def test_one_request_is_queued_and_answered_with_its_record(
    http: TestClient, settings: Settings, photo_root: Path
) -> None:
    record = submit(http, {"input": location(photo_root), "effect": "blur"})
    assert record["status"] == "queued" and record["effect"] == "blur"
    assert record["output"] == f"{(photo_root / 'out').as_uri()}/{record['id']}.png"
    assert http.get(f"/v1/jobs/{record['id']}", headers=AUTH).json() == record
    assert redis_depth(settings, "interactive") == 1


def test_a_list_of_requests_is_queued_in_one_call_in_order(
    http: TestClient, settings: Settings, photo_root: Path
) -> None:
    body = [
        {"input": location(photo_root, "a.png")},
        {"input": location(photo_root, "b.png"), "queue": "bulk"},
        {"input": location(photo_root, "c.png"), "format": "webp"},
    ]
    records = submit(http, body)
    assert [r["input"] for r in records] == [item["input"] for item in body]
    assert [r["queue"] for r in records] == ["interactive", "bulk", "interactive"]
    assert redis_depth(settings, "interactive") == 2
    assert redis_depth(settings, "bulk") == 1


def test_an_idempotency_key_resubmitted_returns_the_same_job(
    http: TestClient, settings: Settings, photo_root: Path
) -> None:
    body = {"input": location(photo_root), "idempotency_key": "upload-7"}
    first, again = submit(http, body), submit(http, body)
    assert again["id"] == first["id"]
    assert redis_depth(settings, "interactive") == 1


def test_more_jobs_than_the_batch_limit_are_refused_whole(db_url: str, photo_root: Path) -> None:
    settings = api_settings(db_url, photo_root, api_max_batch=3)
    with TestClient(create_app(settings)) as http:
        body = [{"input": location(photo_root, f"{i}.png")} for i in range(4)]
        response = http.post("/v1/jobs", json=body, headers=AUTH)
        assert_error(response, 413, "batch_too_large")
        listed = http.get("/v1/jobs", headers=AUTH).json()
    assert listed["jobs"] == []


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"input": "@root/cat.png", "colour": "red"}, "colour"),
        ({"input": "@root/cat.png", "effect": "sparkle"}, "effect"),
        ({"input": "@root/cat.png", "background": "transparent", "format": "jpeg"}, "jpeg"),
        ({"input": "@root/cat.png", "effect": "replace"}, "background"),
        ({"input": "http://example.com/cat.png"}, "input"),
        ({"effect": "remove"}, "input"),
        ([{"input": "@root/a.png"}, {"input": "@root/b.png", "format": "gif"}], "body[1]"),
        ("just a string", "body"),
        ([1, 2], "body"),
    ],
    ids=[
        "unknown-field",
        "bad-effect",
        "jpeg-transparent",
        "replace-without-background",
        "http-location",
        "no-input",
        "bad-item-in-list",
        "not-an-object",
        "list-of-numbers",
    ],
)
def test_invalid_requests_are_422_with_the_error_body(
    http: TestClient, photo_root: Path, body: Any, fragment: str
) -> None:
    def rooted(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rooted(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rooted(v) for v in value]
        if isinstance(value, str) and value.startswith("@root/"):
            return location(photo_root, value.removeprefix("@root/"))
        return value

    response = http.post("/v1/jobs", json=rooted(body), headers=AUTH)
    error = assert_error(response, 422, "invalid_request")
    assert fragment in error["message"]


def test_malformed_json_is_422_with_the_error_body(http: TestClient) -> None:
    response = http.post(
        "/v1/jobs",
        content=b'{"input": "file:///x.png",',
        headers=AUTH | {"Content-Type": "application/json"},
    )
    error = assert_error(response, 422, "invalid_request")
    assert "malformed JSON" in error["message"]


def test_a_location_outside_the_allowed_roots_is_403(http: TestClient) -> None:
    response = http.post("/v1/jobs", json={"input": "file:///etc/passwd"}, headers=AUTH)
    assert_error(response, 403, "access_denied")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{id}"),
        ("POST", "/v1/jobs/{id}/retry"),
        ("POST", "/v1/jobs/{id}/cancel"),
        ("GET", "/v1/jobs/{id}/thumbnail?which=input"),
    ],
)
def test_an_unknown_job_id_is_404(http: TestClient, method: str, path: str) -> None:
    response = http.request(method, path.format(id="no-such-job"), headers=AUTH)
    assert_error(response, 404, "job_not_found")


def test_an_unknown_route_is_404_with_the_error_body(http: TestClient) -> None:
    assert_error(http.get("/v1/nothing-here", headers=AUTH), 404, "not_found")
    assert_error(http.delete("/v1/jobs", headers=AUTH), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "query", ["status=sleeping", "limit=0", "limit=100000", "limit=ten", "cursor=%%%"]
)
def test_bad_listing_parameters_are_422(http: TestClient, query: str) -> None:
    assert_error(http.get(f"/v1/jobs?{query}", headers=AUTH), 422, "invalid_request")


# --- listing, retry, cancel ---------------------------------------------------------------


def test_pages_of_jobs_cover_every_job_once_newest_first(
    http: TestClient, photo_root: Path
) -> None:
    submitted = submit(http, [{"input": location(photo_root, f"{i}.png")} for i in range(5)])
    submitted += submit(http, [{"input": location(photo_root, f"{i}.png")} for i in range(5, 7)])
    seen: list[str] = []
    page_sizes = []
    cursor = None
    while True:
        query = "limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = http.get(f"/v1/jobs?{query}", headers=AUTH).json()
        seen += [job["id"] for job in page["jobs"]]
        page_sizes.append(len(page["jobs"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert "|" not in cursor and decode_cursor(cursor)  # opaque, yet round-trips
    assert sorted(seen) == sorted(r["id"] for r in submitted)
    assert page_sizes[:2] == [3, 3] and sum(page_sizes) == 7
    # The second POST is newer, so its jobs come first.
    assert set(seen[:2]) == {r["id"] for r in submitted[5:]}


def test_listing_filters_by_status(http: TestClient, settings: Settings, photo_root: Path) -> None:
    first, second = submit(http, [{"input": location(photo_root, f"{i}.png")} for i in range(2)])
    run_to_end(settings, first["id"], error_code="invalid_image")
    failed = http.get("/v1/jobs?status=failed", headers=AUTH).json()
    queued = http.get("/v1/jobs?status=queued", headers=AUTH).json()
    assert [job["id"] for job in failed["jobs"]] == [first["id"]]
    assert [job["id"] for job in queued["jobs"]] == [second["id"]]
    assert failed["jobs"][0]["error"] == {
        "code": "invalid_image",
        "message": "invalid_image happened",
    }


def test_a_failed_job_is_retried_and_requeued_but_a_queued_one_is_409(
    http: TestClient, settings: Settings, photo_root: Path
) -> None:
    record = submit(http, {"input": location(photo_root)})
    too_early = http.post(f"/v1/jobs/{record['id']}/retry", headers=AUTH)
    assert_error(too_early, 409, "invalid_transition")
    redis.Redis.from_url(settings.broker_url).delete("interactive")
    run_to_end(settings, record["id"], error_code="input_not_found")
    response = http.post(f"/v1/jobs/{record['id']}/retry", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["status"] == "queued" and response.json()["error"] is None
    assert redis_depth(settings, "interactive") == 1


def test_a_queued_job_is_canceled_but_a_running_one_is_409(
    http: TestClient, settings: Settings, photo_root: Path
) -> None:
    queued, running = submit(http, [{"input": location(photo_root, f"{i}.png")} for i in range(2)])
    start(settings, running["id"])
    response = http.post(f"/v1/jobs/{queued['id']}/cancel", headers=AUTH)
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    error = assert_error(
        http.post(f"/v1/jobs/{running['id']}/cancel", headers=AUTH), 409, "invalid_transition"
    )
    assert "running" in error["message"]


# --- thumbnails, stats, health, docs ------------------------------------------------------


def test_a_succeeded_jobs_images_are_served_as_stored(
    http: TestClient, settings: Settings, photo_root: Path, photo_bytes: dict[str, bytes]
) -> None:
    (photo_root / "cat.png").write_bytes(photo_bytes["chelsea"])
    record = submit(http, {"input": location(photo_root)})
    assert_error(
        http.get(f"/v1/jobs/{record['id']}/thumbnail?which=output", headers=AUTH),
        404,
        "job_not_found",
    )
    Path(record["output"].removeprefix("file://")).parent.mkdir(parents=True)
    Path(record["output"].removeprefix("file://")).write_bytes(photo_bytes["coffee"])
    run_to_end(settings, record["id"])
    for which, name in (("input", "chelsea"), ("output", "coffee")):
        response = http.get(f"/v1/jobs/{record['id']}/thumbnail?which={which}", headers=AUTH)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.content == photo_bytes[name]
    assert_error(
        http.get(f"/v1/jobs/{record['id']}/thumbnail?which=mask", headers=AUTH),
        422,
        "invalid_request",
    )


def test_an_image_over_the_thumbnail_cap_is_413(
    db_url: str, photo_root: Path, photo_bytes: dict[str, bytes]
) -> None:
    (photo_root / "cat.png").write_bytes(photo_bytes["chelsea"])
    settings = api_settings(db_url, photo_root, api_thumbnail_max_bytes=1000)
    with TestClient(create_app(settings)) as http:
        record = submit(http, {"input": location(photo_root)})
        response = http.get(f"/v1/jobs/{record['id']}/thumbnail?which=input", headers=AUTH)
    assert_error(response, 413, "input_too_large")


def test_stats_count_the_jobs_by_status_and_queue(
    http: TestClient, settings: Settings, photo_root: Path
) -> None:
    records = submit(
        http,
        [{"input": location(photo_root, f"{i}.png"), "queue": "bulk"} for i in range(3)],
    )
    run_to_end(settings, records[0]["id"], error_code="invalid_image")
    body = http.get("/v1/stats", headers=AUTH).json()
    assert body["jobs"]["by_status"] == {
        "queued": 2,
        "running": 0,
        "succeeded": 0,
        "failed": 1,
        "canceled": 0,
    }
    assert body["jobs"]["by_queue"]["bulk"]["queued"] == 2
    assert body["failures_by_code"] == {"invalid_image": 1}
    assert body["queue_depth"] == {"interactive": 0, "bulk": 3}


def test_health_is_200_with_a_database_and_503_without(http: TestClient, photo_root: Path) -> None:
    assert http.get("/healthz").json() == {"status": "ok", "database": "ok"}
    down = api_settings("postgresql+psycopg://postgres@127.0.0.1:1/none", photo_root)
    with TestClient(create_app(down)) as unreachable:
        assert_error(unreachable.get("/healthz"), 503, "database_unavailable")
        assert_error(unreachable.get("/v1/jobs/x", headers=AUTH), 503, "database_unavailable")


def test_openapi_docs_are_served(http: TestClient) -> None:
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/stats", "/healthz"} <= set(paths)


# --- auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
    ],
    ids=["missing", "wrong", "prefix-of-nothing", "basic-scheme", "empty"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("POST", "/v1/jobs/x/retry"),
        ("POST", "/v1/jobs/x/cancel"),
        ("GET", "/v1/jobs/x/thumbnail"),
        ("GET", "/v1/stats"),
    ],
)
def test_every_data_route_refuses_a_missing_or_wrong_token(
    http: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = http.request(method, path, headers=headers, json={"input": "file:///x.png"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_any_configured_token_is_accepted_and_health_metrics_and_page_are_public(
    http: TestClient,
) -> None:
    assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {OTHER_TOKEN}"}).is_success
    assert http.get("/healthz").status_code == 200
    assert http.get("/metrics").status_code == 200
    page = http.get("/dashboard")
    assert page.status_code == 200 and "<title>Backdrop</title>" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_without_tokens_the_api_refuses_to_start_unless_explicitly_insecure(
    db_url: str, photo_root: Path
) -> None:
    with pytest.raises(ApiMisconfigured, match="BACKDROP_API_TOKENS"):
        create_app(api_settings(db_url, photo_root, api_tokens=[]))
    insecure = api_settings(db_url, photo_root, api_tokens=[], api_insecure_no_auth=True)
    with TestClient(create_app(insecure)) as http:
        assert http.get("/v1/jobs").json() == {"jobs": [], "next_cursor": None}
