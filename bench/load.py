"""Load: N jobs submitted in bulk through the HTTP API, run by a real worker to the end.

Prints the figures: submission rate (jobs/s through POST /v1/jobs), completion rate, jobs lost
(accepted but not final, or succeeded with no output written), jobs doubled (an output written
more than once, or written for a failed job, or an object written that no job succeeded
for), and whether database and storage agree. Writes are counted at the S3 endpoint: the
worker reaches storage through the counting proxy (tests/support/faulty_s3.py), which records every
PUT the store acknowledged, per key, so a second PUT to the same key is seen.

    .venv/bin/python bench/load.py [--jobs 5000]

Self-contained: starts a moto S3 server, dedicated PostgreSQL and Redis servers
(tests/support/stack.py) and one worker with a random-init DeepLabV3-MobileNetV3 at a
64-pixel model input, reaching storage through the counting proxy.
tests/test_load.py runs the same code with fewer jobs.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

TOKEN = "load-" + uuid.uuid4().hex
# Every FAIL_EVERY-th job names a missing input: it must fail, and leave no output.
FAIL_EVERY = 50
SUBMIT_CHUNK = 1000


@dataclass(frozen=True)
class LoadFigures:
    jobs: int
    submit_s: float
    complete_s: float
    succeeded: int
    failed: int
    lost: int
    doubled: int
    outputs_stored: int
    # Succeeded jobs by how many times their output was written (exactly once: {1: all}).
    writes_per_success: dict[int, int]
    writes_for_failures: int

    @property
    def submit_rate(self) -> float:
        return self.jobs / self.submit_s

    @property
    def completion_rate(self) -> float:
        return self.jobs / self.complete_s

    def lines(self) -> list[str]:
        return [
            f"jobs submitted:            {self.jobs}",
            f"submission rate (API):     {self.submit_rate:,.0f} jobs/s ({self.submit_s:.2f} s)",
            f"completion rate:           {self.completion_rate:,.1f} jobs/s "
            f"({self.complete_s:.1f} s from first submit to last final)",
            f"succeeded / failed:        {self.succeeded} / {self.failed}",
            f"jobs lost:                 {self.lost}",
            f"jobs doubled:              {self.doubled}",
            f"outputs in storage:        {self.outputs_stored}",
            "PUTs per succeeded job:    "
            + ", ".join(f"{n}: {jobs} jobs" for n, jobs in sorted(self.writes_per_success.items())),
            f"PUTs for failed jobs:      {self.writes_for_failures}",
        ]


def tiny_photo(seed: int = 0) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def run_load(stack, count: int, *, timeout: float) -> LoadFigures:
    """Submit `count` jobs through the API of `stack` (a support Stack); wait for all."""
    from fastapi.testclient import TestClient

    from producer.api import create_app
    from producer.services import Services
    from producer.settings import Settings

    photo = stack.upload(f"load-{uuid.uuid4().hex[:6]}/photo.png", tiny_photo())
    prefix = f"s3://{stack.bucket}/load-out-{uuid.uuid4().hex[:6]}"
    requests = [
        {
            "input": photo if i % FAIL_EVERY else f"s3://{stack.bucket}/absent/{i}.png",
            "output": f"{prefix}/{i}.png",
            "queue": "bulk",
            # Random weights: whatever the mask holds, the job does its full work.
            "fail_on_no_subject": False,
        }
        for i in range(count)
    ]
    settings = Settings(**{**stack.settings.model_dump(), "api_tokens": [TOKEN]})
    app = create_app(Services(settings, storage=stack.storage, celery=stack.client.celery))
    job_ids: list[str] = []
    with TestClient(app) as http:
        started = time.monotonic()
        for start_at in range(0, count, SUBMIT_CHUNK):
            response = http.post(
                "/v1/jobs",
                json=requests[start_at : start_at + SUBMIT_CHUNK],
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert response.status_code == 202, response.text
            job_ids.extend(record["id"] for record in response.json())
        submit_s = time.monotonic() - started
    deadline = time.monotonic() + timeout
    while not stack.all_final(job_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    complete_s = time.monotonic() - started

    records = stack.records(job_ids)
    stored = {info.location for info in stack.storage.list(prefix + "/")}
    succeeded = {r["output"] for r in records.values() if r["status"] == "succeeded"}
    failed = {r["output"] for r in records.values() if r["status"] == "failed"}
    writes = {
        f"s3:/{path}": count for path, count in stack.proxy.writes(stack.key_of(prefix)).items()
    }
    everyone = {r["output"] for r in records.values()}
    per_success = Counter(writes.get(output, 0) for output in succeeded)
    not_final = len(job_ids) - len(succeeded) - len(failed)
    lost = not_final + len(succeeded - stored) + per_success[0]
    # (A job still running when the deadline passed is counted lost, not doubled.)
    doubled = (
        sum((n - 1) * jobs for n, jobs in per_success.items() if n > 1)
        + sum(writes.get(output, 0) for output in failed)
        + sum(count for output, count in writes.items() if output not in everyone)
        + len(stored & failed)
        + len(stored - everyone)
    )
    return LoadFigures(
        jobs=count,
        submit_s=submit_s,
        complete_s=complete_s,
        succeeded=len(succeeded),
        failed=len(failed),
        lost=lost,
        doubled=doubled,
        outputs_stored=len(stored),
        writes_per_success=dict(per_success),
        writes_for_failures=sum(writes.get(output, 0) for output in failed),
    )


def main() -> None:
    import os
    import tempfile

    from tests.support.services import S3_TEST_CREDENTIALS, MotoServer
    from tests.support.stack import build_stack
    from tests.support.weights import save_varying_mobilenet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    os.environ.update(S3_TEST_CREDENTIALS)
    folder = Path(tempfile.mkdtemp(prefix="backdrop-load-"))
    # Lively weights: masks vary with the photo, so refinement does its full work.
    weights = save_varying_mobilenet(folder / "mobilenet-random.pth")
    moto = MotoServer()
    stack = None
    try:
        moto.start()
        stack = build_stack(folder, moto.endpoint, weights, **LOAD_ENV)
        stack.start_workers(1)
        figures = run_load(stack, args.jobs, timeout=args.timeout)
        print("\n".join(figures.lines()))
    finally:
        if stack is not None:
            stack.close()
        moto.stop()


# The worker's settings under load: bigger batches, the smallest model input.
LOAD_ENV = {
    "BACKDROP_MODEL_INPUT_SIZE": "64",
    "BACKDROP_MAX_BATCH": "16",
    "BACKDROP_MAX_WAIT_MS": "10",
    "BACKDROP_JOB_LEASE_S": "30",
    "BACKDROP_VISIBILITY_TIMEOUT_S": "600",
}


if __name__ == "__main__":
    main()
