"""Load: jobs submitted in bulk through the HTTP API all reach a final state, and the
database and storage agree: exactly one PUT per succeeded job's output and none for a failed
job's, counted at the S3 endpoint (the worker goes through the counting proxy).

CI runs LOAD_JOBS jobs; `bench/load.py` runs the same code with 5,000 and prints the figures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load import FAIL_EVERY, LOAD_ENV, run_load
from tests.support.stack import Stack, build_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOAD_JOBS = int(os.environ.get("BACKDROP_TEST_LOAD_JOBS", "300"))


@pytest.fixture(scope="module")
def stack(
    s3_server: str, mobilenet_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = build_stack(tmp_path_factory.mktemp("load"), s3_server, mobilenet_weights, **LOAD_ENV)
    try:
        stack.start_workers(1)
        yield stack
    finally:
        stack.close()


def test_jobs_submitted_in_bulk_all_finish_and_database_and_storage_agree(stack: Stack) -> None:
    # A deadline, not a speed claim: a second per job covers a CI machine shared with others.
    figures = run_load(stack, LOAD_JOBS, timeout=60 + LOAD_JOBS)
    print("\n" + "\n".join(f"FIGURE {line}" for line in figures.lines()))
    assert figures.lost == 0
    assert figures.doubled == 0
    assert figures.failed == len(range(0, LOAD_JOBS, FAIL_EVERY))
    assert figures.succeeded == figures.outputs_stored == LOAD_JOBS - figures.failed
    assert figures.writes_per_success == {1: figures.succeeded}
    assert figures.writes_for_failures == 0
