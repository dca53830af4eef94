"""Log lines: the job id on each, and one line per record whatever a message carries."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from producer.logs import FORMAT, JobIdFilter, OneLineFormatter, escape, job_context

FORGED = "2099-01-01 00:00:00,000 INFO [job=forged] worker.tasks: forged line"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(FORMAT))
    handler.addFilter(JobIdFilter())
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_every_line_carries_the_job_id(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    with job_context("job-1"):
        logger.info("started")
    assert "[job=job-1]" in stream.getvalue()


@pytest.mark.parametrize("separator", ["\n", "\r", "\r\n", "\u2028", "\x85"])
def test_a_location_in_a_message_cannot_start_a_forged_line(
    captured: tuple[logging.Logger, io.StringIO], separator: str
) -> None:
    logger, stream = captured
    with job_context("job-1"):
        logger.info("started (%s)", f"file:///data/in.png{separator}{FORGED}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "[job=job-1]" in lines[0] and "forged line" in lines[0]


def test_terminal_escapes_are_shown_not_sent(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.warning("key %s", "photo\x1b[2J\x1b]0;title\x07.png")
    assert "\x1b" not in stream.getvalue() and "\x07" not in stream.getvalue()
    assert "photo\\x1b[2J" in stream.getvalue()


def test_a_traceback_keeps_its_lines_but_none_passes_for_a_record(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    try:
        raise ValueError(f"bad key\n{FORGED}")
    except ValueError:
        logger.exception("failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("failed")
    assert rest and all(line.startswith("    | ") for line in rest)
    assert any("Traceback" in line for line in rest)


def test_escape_leaves_printable_text_alone() -> None:
    assert escape("s3://bucket/photo été 1%.png") == "s3://bucket/photo été 1%.png"
    assert escape("a\tb\x00") == "a\\tb\\x00"
    assert escape("lone \udc80 surrogate") == "lone \\udc80 surrogate"
