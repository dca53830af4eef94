"""The dashboard in a real headless Chromium, served by uvicorn over PostgreSQL."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from producer import jobs
from producer.api import create_app
from producer.db import session_scope
from producer.request import JobRequest
from producer.settings import Settings
from tests.conftest import poll_until, require_service, run_to_end

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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
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
            yield browser.new_page()
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
