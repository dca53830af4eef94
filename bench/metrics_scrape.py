"""/metrics under load: what an unauthenticated scrape costs, and what 200 concurrent scrapes
do to an authenticated `GET /v1/stats`, with the job counts read at every scrape (before) and
cached for BACKDROP_API_METRICS_REFRESH_S (after), rate limit off and on.

    .venv/bin/python bench/metrics_scrape.py [--rows 500000] [--scrapes 200]

Needs the PostgreSQL of the tests (127.0.0.1:5432, trust auth): makes its own database,
fills the jobs table with generate_series, and runs `backdrop api` as a subprocess per
configuration so the clients here do not share its interpreter.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.network import free_port
from tests.support.polling import poll_until
from tests.support.postgres import fresh_database

TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIGURATIONS = {
    "before: counted at every scrape, no rate limit": {
        "BACKDROP_API_METRICS_REFRESH_S": "0",
        "BACKDROP_API_RATE_LIMIT_PER_S": "0",
    },
    "after: counts cached 5 s, no rate limit": {
        "BACKDROP_API_METRICS_REFRESH_S": "5",
        "BACKDROP_API_RATE_LIMIT_PER_S": "0",
    },
    "after: defaults (cached 5 s, 5/s burst 20 per address)": {},
}
FILL = """
INSERT INTO jobs (id, status, queue, input, output, effect, params, attempts, created_at,
                  finished_at, worker)
SELECT gen_random_uuid()::text,
       (ARRAY['queued','running','succeeded','succeeded','succeeded','failed','canceled'])
           [1 + i % 7],
       (ARRAY['interactive','bulk','bulk'])[1 + i % 3],
       's3://bench/in/' || i || '.jpg', 's3://bench/out/' || i || '.png', 'remove',
       '{"background": "white"}'::json, 1, now() - i * interval '1 second',
       now() - i * interval '1 second' + interval '2 seconds', 'worker-' || (i % 8)
FROM generate_series(1, :rows) AS i
"""


@contextmanager
def database(rows: int) -> Iterator[str]:
    with fresh_database("bench_metrics") as url:
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text(FILL), {"rows": rows})
            connection.execute(text("ANALYZE jobs"))
        engine.dispose()
        yield url


@contextmanager
def api(url: str, folder: Path, overrides: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKDROP_")}
    env |= {
        "BACKDROP_DATABASE_URL": url,
        "BACKDROP_DATA_DIR": str(folder),
        "BACKDROP_API_TOKENS": TOKEN,
        **overrides,
    }
    command = [sys.executable, "-m", "producer.cli", "api", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        poll_until(answers, timeout=60, what="the API")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=20)


def timed(call: object) -> tuple[float, int]:
    started = time.perf_counter()
    status = call()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000, status


def measure(base: str, scrapes: int) -> dict[str, object]:
    with httpx.Client(base_url=base, timeout=120) as http:
        http.get("/metrics", headers=AUTH)  # warm: the cache is filled once here
        scrape_ms = [
            timed(lambda: http.get("/metrics", headers=AUTH).status_code)[0] for _ in range(20)
        ]
        stats_alone = [
            timed(lambda: http.get("/v1/stats", headers=AUTH).status_code)[0] for _ in range(5)
        ]
    statuses: Counter[int] = Counter()
    stats_loaded: list[float] = []
    start = threading.Barrier(2)

    def stats_probe() -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            start.wait()
            for _ in range(5):
                stats_loaded.append(
                    timed(lambda: http.get("/v1/stats", headers=AUTH).status_code)[0]
                )

    # One client, one connection per scrape: the clients' own cost stays small next to the API's.
    scraper = httpx.Client(base_url=base, timeout=120, limits=httpx.Limits(max_connections=scrapes))

    def scrape(_: int) -> int:
        # No token: Prometheus scrapes anonymously, and so does an attacker.
        return scraper.get("/metrics").status_code

    probe = threading.Thread(target=stats_probe)
    probe.start()
    burst_started = time.perf_counter()
    with scraper, ThreadPoolExecutor(scrapes) as pool:
        start.wait()
        statuses.update(pool.map(scrape, range(scrapes)))
    burst_s = time.perf_counter() - burst_started
    probe.join()
    return {
        "scrape_ms": statistics.median(scrape_ms),
        "stats_alone_ms": statistics.median(stats_alone),
        "stats_loaded_ms": statistics.median(stats_loaded),
        "stats_loaded_max_ms": max(stats_loaded),
        "burst_s": burst_s,
        "statuses": dict(sorted(statuses.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    print(f"jobs table: {args.rows:,} rows on PostgreSQL; {args.scrapes} concurrent scrapes")
    with database(args.rows) as url, tempfile.TemporaryDirectory() as folder:
        for name, overrides in CONFIGURATIONS.items():
            with api(url, Path(folder), overrides) as base:
                figures = measure(base, args.scrapes)
            print(f"\n{name}")
            print(f"  one scrape, median of 20:              {figures['scrape_ms']:8.1f} ms")
            print(f"  GET /v1/stats alone, median of 5:      {figures['stats_alone_ms']:8.1f} ms")
            print(
                f"  GET /v1/stats during the scrapes:      {figures['stats_loaded_ms']:8.1f} ms "
                f"median, {figures['stats_loaded_max_ms']:.1f} ms max"
            )
            print(
                f"  {args.scrapes} scrapes took {figures['burst_s']:.2f} s; "
                f"answers {figures['statuses']}"
            )


if __name__ == "__main__":
    main()
