"""The dashboard in a real headless Chromium, served by uvicorn over PostgreSQL."""

from __future__ import annotations

import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from sqlalchemy import delete

from producer import jobs
from producer.api import create_app
from producer.db import session_scope
from producer.models import Backfill, Job
from producer.request import JobRequest
from producer.services import Services
from producer.settings import Settings
from tests.support.polling import poll_until
from tests.support.required import require_service
from tests.support.transitions import run_to_end

pytestmark = pytest.mark.integration

TOKEN = "dashboard-token-0123456789abcdefghij"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Neither UTC nor the machine's zone: a time shown in UTC would not pass for local.
BROWSER_ZONE = "Asia/Kolkata"
WIDTHS = (1400, 1000)


def add_job(url: str, request: JobRequest, *, error: tuple[str, str] | None = None) -> str:
    with session_scope(url) as session:
        (created,) = jobs.create(session, [request], "file:///unused")
        job_id = created.job.id
    run_to_end(
        url,
        job_id,
        worker="worker-dash",
        error=error,
        timings_ms={"segment": 40.0, "upload": 4.0},
        input_size=(512, 512),
    )
    return job_id


@pytest.fixture
def site(db_url: str, tmp_path: Path, photo_bytes: dict[str, bytes]) -> Iterator[str]:
    """A running API with two succeeded jobs (real photos stored) and two failed ones."""
    root = tmp_path / "photos"
    root.mkdir()
    for name, data in photo_bytes.items():
        (root / f"{name}.png").write_bytes(data)
    for before, after in (("astronaut", "coffee"), ("chelsea", "motorcycle_left")):
        request = JobRequest(
            input=(root / f"{before}.png").as_uri(), output=(root / f"{after}.png").as_uri()
        )
        add_job(db_url, request)
    add_job(
        db_url,
        JobRequest(input=(root / "broken.png").as_uri()),
        error=("invalid_image", "cannot decode <broken.png>: not an image"),
    )
    add_job(
        db_url,
        JobRequest(input=(root / "gone.png").as_uri(), queue="bulk"),
        error=("input_not_found", "no object at gone.png"),
    )
    settings = Settings(
        database_url=db_url,
        data_dir=tmp_path / "data",
        local_roots=[str(root)],
        api_tokens=[TOKEN],
    )
    with serve(settings) as url:
        yield url


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The API on a free local port, in a thread."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(Services(settings)), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll_until(lambda: server.started, timeout=20, what="uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page() -> Iterator[object]:
    require_service("chromium", Path(CHROMIUM).exists() or bool(shutil.which("chromium")))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(timezone_id=BROWSER_ZONE, locale="en-GB")
        finally:
            browser.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_dashboard_shows_counts_failures_and_thumbnails(
    site: str, page: object, db_url: str
) -> None:
    from playwright.sync_api import expect

    page.goto(f"{site}/dashboard#token={TOKEN}")
    expect(page.locator("#count-succeeded")).to_have_text("2", timeout=WAIT_MS)
    expect(page.locator("#count-failed")).to_have_text("2")
    expect(page.locator("#count-total")).to_have_text("4")
    expect(page.locator("#queue-bulk-failed")).to_have_text("1")
    expect(page.locator("#failures-invalid_image")).to_have_text("1")
    expect(page.locator("#throughput-hour")).to_have_text("4")
    expect(page.locator("#latency-p50")).not_to_have_text("–")
    failures = page.locator("#failures tr.failure")
    expect(failures).to_have_count(2)
    # Markup in a message stays text: the page never renders API data as HTML.
    expect(failures.filter(has_text="cannot decode <broken.png>: not an image")).to_have_count(1)
    expect(failures.filter(has_text="input_not_found")).to_have_count(1)
    page.wait_for_function(
        """() => {
            const images = [...document.querySelectorAll('#thumbs img')];
            return images.length === 4 && images.every((i) => i.complete && i.naturalWidth > 0);
        }""",
        timeout=WAIT_MS,
    )
    assert "token" not in page.url  # taken out of the address bar once read
    newest = httpx.get(f"{site}/v1/jobs?status=failed&limit=1", headers=AUTH).json()["jobs"][0]
    local = datetime.fromisoformat(newest["finished_at"]).astimezone(ZoneInfo(BROWSER_ZONE))
    expect(failures.first.locator("td").first).to_contain_text(local.strftime("%H:%M:%S"))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_dashboard_asks_for_a_token_and_refreshes_itself(
    site: str, page: object, db_url: str
) -> None:
    from playwright.sync_api import expect

    page.goto(f"{site}/dashboard")
    expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
    page.fill("#token", "not-the-token")
    page.click("#login button")
    expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
    page.fill("#token", TOKEN)
    page.click("#login button")
    expect(page.locator("#count-failed")).to_have_text("2", timeout=WAIT_MS)
    add_job(
        db_url,
        JobRequest(input="file:///elsewhere/late.png"),
        error=("no_subject", "nothing to keep in late.png"),
    )
    # No reload: the page polls the API every few seconds.
    expect(page.locator("#count-failed")).to_have_text("3", timeout=WAIT_MS)
    expect(page.locator("#failures tr.failure", has_text="nothing to keep")).to_have_count(1)


# --- charts -------------------------------------------------------------------------------

FAILED_BACKFILL = "its first 20 jobs all failed access_denied (no access to s3://in): check grants"


def job_row(index: int, *, finished: datetime | None, latency_s: float, **fields: object) -> Job:
    created = (finished or datetime.now(UTC)) - timedelta(seconds=latency_s)
    values: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "status": "succeeded",
        "queue": "interactive",
        "input": f"s3://photos/{index}.jpg",
        "output": f"s3://out/{index}.png",
        "effect": "remove",
        "params": {},
        "attempts": 1,
        "created_at": created,
        "started_at": created if finished else None,
        "finished_at": finished,
    }
    return Job(**(values | fields))


def history(now: datetime) -> list[Job]:
    """A day of work with a shape: a steady interactive trickle with a slow spell, a bulk
    backlog created 40 minutes ago and drained since, a few failures, one still waiting."""
    rows: list[Job] = []
    for minute in range(24 * 60, 0, -7):  # the day before the last hour, sparsely
        finished = now - timedelta(minutes=minute)
        rows.append(job_row(len(rows), finished=finished, latency_s=1.2))
    for minute in range(60):
        finished = now - timedelta(minutes=59 - minute, seconds=1)
        slow = 3.0 if 20 <= minute < 30 else 1.0
        for k in range(2 + minute % 3):
            rows.append(job_row(len(rows), finished=finished, latency_s=slow * (0.6 + 0.2 * k)))
        if minute % 9 == 4:
            rows.append(
                job_row(
                    len(rows),
                    finished=finished,
                    latency_s=0.4,
                    status="failed",
                    error_code="invalid_image",
                    error_message="not an image",
                )
            )
        if minute % 17 == 8:
            rows.append(
                job_row(
                    len(rows),
                    finished=finished,
                    latency_s=0.9,
                    status="failed",
                    error_code="no_subject",
                    error_message="no subject",
                )
            )
    burst = now - timedelta(minutes=40)
    for k in range(150):
        # Each waits in the bulk queue from the burst until 10 s before it finishes.
        drained = burst + timedelta(seconds=18 * k + 30)
        done = drained < now
        rows.append(
            job_row(
                len(rows),
                finished=drained if done else None,
                queue="bulk",
                latency_s=0,
                created_at=burst,
                started_at=drained - timedelta(seconds=10),
                status="succeeded" if done else "queued",
            )
        )
    rows.append(job_row(len(rows), finished=None, latency_s=30, status="queued"))
    rows.append(
        job_row(
            len(rows),
            finished=now - timedelta(minutes=3),
            latency_s=5,
            status="canceled",
            started_at=None,
        )
    )
    for row in rows:
        if row.status == "queued":
            row.started_at = None
    return rows


def with_thumbnails(rows: list[Job], root: Path, photos: dict[str, bytes]) -> None:
    """The newest interactive results point at real photos and cut-outs of them."""
    from PIL import Image, ImageDraw

    newest = sorted(
        (r for r in rows if r.status == "succeeded" and r.queue == "interactive"),
        key=lambda r: r.created_at,
    )[-6:]
    names = sorted(photos)
    for k, row in enumerate(newest):
        name = names[k % len(names)]
        photo = root / f"{name}.png"
        photo.write_bytes(photos[name])
        image = Image.open(photo).convert("RGBA")
        alpha = Image.new("L", image.size, 0)
        width, height = image.size
        oval = (width // 5, height // 8, width * 4 // 5, height * 7 // 8)
        ImageDraw.Draw(alpha).ellipse(oval, 255)
        image.putalpha(alpha)
        cutout = root / f"{name}-{k}-cutout.png"
        image.save(cutout)
        row.input, row.output = photo.as_uri(), cutout.as_uri()


@pytest.fixture
def busy_site(db_url: str, tmp_path: Path, photo_bytes: dict[str, bytes]) -> Iterator[str]:
    now = datetime.now(UTC)
    backfill_id = str(uuid.uuid4())
    root = tmp_path / "photos"
    root.mkdir()
    rows = history(now)
    with_thumbnails(rows, root, photo_bytes)
    with session_scope(db_url) as session:
        session.add_all(rows)
        session.add(
            Backfill(
                id=backfill_id,
                status="failed",
                source="s3://in/",
                output_prefix="s3://out/",
                options={},
                model="deeplabv3_resnet101",
                max_in_flight=10,
                listed=40,
                skipped=0,
                submitted=20,
                succeeded=0,
                failed=20,
                listing_done=False,
                error=FAILED_BACKFILL,
                created_at=now,
                updated_at=now,
                finished_at=now,
            )
        )
    settings = Settings(
        database_url=db_url, data_dir=tmp_path / "data", local_roots=[str(root)], api_tokens=[TOKEN]
    )
    with serve(settings) as url:
        yield url
    with session_scope(db_url) as session:
        session.execute(delete(Backfill).where(Backfill.id == backfill_id))
        session.execute(delete(Job))


def drawn(page: object) -> dict[str, object]:
    """What the charts hold: bars, points per line, dots, and how far tables stick out."""
    return page.evaluate(
        """() => ({
            bars: document.querySelectorAll('#chart-throughput rect.bar').length,
            depthPoints: Object.fromEntries([...document.querySelectorAll('#chart-depth polyline')]
                .map((line) => [line.dataset.queue, line.points.numberOfItems])),
            dots: document.querySelectorAll('#chart-latency circle.dot').length,
            ticks: [...document.querySelectorAll('#chart-throughput text.tick')]
                .map((tick) => tick.textContent),
            overflow: Math.max(...[...document.querySelectorAll('main section')].map((section) =>
                Math.max(...[...section.querySelectorAll('table')].map((table) =>
                    table.getBoundingClientRect().right - section.getBoundingClientRect().right)))),
            queueTableScrolls: document.querySelector('#by-queue').parentElement.scrollWidth
                > document.querySelector('#by-queue').parentElement.clientWidth,
        })"""
    )


def expected(series: dict) -> dict[str, object]:
    flow, latency = series["throughput_per_min"], series["latency_ms"]
    return {
        "bars": sum(1 for values in flow.values() for v in values if v),
        "depthPoints": {queue: len(series["times"]) for queue in series["queue_depth"]},
        "dots": sum(
            1
            for lines in latency.values()
            for values in lines.values()
            for v in values
            if v is not None
        ),
    }


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_charts_draw_the_series_and_nothing_overflows_at_either_width(
    busy_site: str, page: object, db_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(f"{busy_site}/dashboard#token={TOKEN}")
        expect(page.locator("body")).to_have_attribute("data-loaded", "true", timeout=WAIT_MS)
        expect(page.locator("#trends")).to_have_attribute("data-window", "1h")
        series = httpx.get(f"{busy_site}/v1/stats/series?window=1h", headers=AUTH).json()
        shown = drawn(page)
        want = expected(series)
        # A minute may turn between the page's request and ours: at most one bucket moves.
        assert abs(shown["bars"] - want["bars"]) <= len(series["throughput_per_min"]), shown
        assert shown["bars"] > 60 and shown["depthPoints"] == {"interactive": 60, "bulk": 60}
        assert abs(shown["dots"] - want["dots"]) <= 4 and shown["dots"] > 60
        assert len(shown["ticks"]) == 6 and all(":" in tick for tick in shown["ticks"])
        assert shown["overflow"] <= 0.5, f"a table sticks out {shown['overflow']}px at {width}px"
        assert not shown["queueTableScrolls"]
        expect(page.locator("#backfills td.code", has_text=FAILED_BACKFILL)).to_have_count(1)
        page.screenshot(path=str(tmp_path / f"dashboard-{width}.png"), full_page=True)

    page.click(".window button[data-window='24h']")
    expect(page.locator("#trends")).to_have_attribute("data-window", "24h", timeout=WAIT_MS)
    day = drawn(page)
    assert day["depthPoints"] == {"interactive": 96, "bulk": 96}
    want = expected(httpx.get(f"{busy_site}/v1/stats/series?window=24h", headers=AUTH).json())
    assert abs(day["bars"] - want["bars"]) <= 4 and day["bars"] > 60
    page.screenshot(path=str(tmp_path / "dashboard-24h.png"), full_page=True)
