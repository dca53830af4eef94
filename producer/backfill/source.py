"""A backfill's source: the photos under a prefix, or listed in a manifest, in chunks.

The source is walked in a fixed order (S3 lists keys sorted; a manifest by line number), so a
chunk's position is a cursor a resumed backfill starts after.
"""

from __future__ import annotations

import contextlib
import csv
import queue
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from producer.errors import InputNotFound, InvalidRequest
from producer.locations import FILE_SCHEME, canonical_prefix
from producer.storage import S3_SCHEME, Storage

HEAD_THREADS = 16


@dataclass(frozen=True)
class Item:
    location: str
    etag: str
    relative: str  # the key under the source, which names the output under the output prefix


@dataclass(frozen=True)
class Chunk:
    items: list[Item]
    position: str  # the cursor once this chunk is recorded


def is_manifest(source: str) -> bool:
    return source.lower().endswith(".csv")


def under(location: str, prefix: str) -> bool:
    return location.startswith(prefix.rstrip("/") + "/")


def walk(
    storage: Storage, source: str, cursor: str | None, size: int, exclude: str
) -> Generator[Chunk, None, None]:
    """The source's photos after `cursor`, in chunks; locations under `exclude` (the output
    prefix) are left out so a backfill never processes its own outputs."""
    if is_manifest(source):
        yield from _manifest_chunks(storage, source, int(cursor or 0), size)
        return
    yield from _listing_chunks(storage, source, cursor, size, exclude)


def _listing_chunks(
    storage: Storage, source: str, cursor: str | None, size: int, exclude: str
) -> Iterator[Chunk]:
    items: list[Item] = []
    position = cursor
    base = canonical_prefix(source)
    # A resume lists from the cursor on (S3's StartAfter), not from the start again.
    for info in storage.list(source, page_size=1000, start_after=cursor):
        position = info.location
        if not under(info.location, exclude):
            items.append(Item(info.location, info.etag, _relative(info.location, base)))
        if len(items) >= size:
            yield Chunk(items, position)
            items = []
    if position is not None and position != cursor:
        yield Chunk(items, position)


def _relative(location: str, source: str) -> str:
    """The key under the source, as a name: a file location's percent-encoding is undone
    (`join` encodes the output's name again)."""
    rest = location[len(source) :].lstrip("/") if location.startswith(source) else ""
    rest = rest or location.rsplit("/", 1)[-1]
    return unquote(rest) if location.startswith(FILE_SCHEME) else rest


def _manifest_lines(storage: Storage, source: str) -> Iterator[str]:
    if "://" not in source:
        path = Path(source)
        if not path.is_file():
            raise InvalidRequest(f"manifest {source} is not a file")
        with path.open(encoding="utf-8") as manifest:
            yield from manifest
        return
    # Read whole: a manifest of a million keys is tens of MB, and storage has no ranged read.
    yield from storage.read(source).decode("utf-8").splitlines()


def _manifest_chunks(storage: Storage, source: str, done: int, size: int) -> Iterator[Chunk]:
    """`bucket,key[,version]` lines as S3 Batch Operations writes them (keys URL-encoded);
    the cursor counts lines handled. ETags come from HEAD requests, a chunk at a time."""
    rows: list[tuple[str, str]] = []
    line_number = 0
    with ThreadPoolExecutor(HEAD_THREADS, thread_name_prefix="backfill-head") as pool:
        for line_number, row in enumerate(csv.reader(_manifest_lines(storage, source)), 1):
            if line_number <= done:
                continue
            rows.append(_manifest_row(row, line_number))
            if len(rows) >= size:
                yield Chunk(_headed(storage, pool, rows), str(line_number))
                rows = []
        if line_number > done:
            yield Chunk(_headed(storage, pool, rows), str(line_number))


def _manifest_row(row: list[str], line_number: int) -> tuple[str, str]:
    if len(row) < 2 or not row[0].strip() or not row[1]:
        raise InvalidRequest(f"manifest line {line_number}: expected bucket,key")
    return row[0].strip(), unquote(row[1])


def _headed(storage: Storage, pool: ThreadPoolExecutor, rows: list[tuple[str, str]]) -> list[Item]:
    locations = [f"{S3_SCHEME}{bucket}/{key}" for bucket, key in rows]
    etags = pool.map(lambda location: _etag(storage, location), locations)
    return [
        Item(location, etag, key)
        for location, etag, (_, key) in zip(locations, etags, rows, strict=True)
    ]


def _etag(storage: Storage, location: str) -> str:
    try:
        return storage.head(location).etag
    except InputNotFound:
        # Still a job: it fails with input_not_found and lands in the failure report.
        return ""


def read_ahead(chunks: Generator[Chunk, None, None]) -> Generator[Chunk, None, None]:
    """`chunks`, listed one chunk ahead in a thread: the next listing page (or a manifest
    chunk's HEADs) is fetched while this one is recorded, instead of after it. Closing this
    generator stops the reader after at most one more chunk."""
    ready: queue.Queue[Chunk | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for chunk in chunks:
                ready.put(chunk)
                if stop.is_set():
                    return
            ready.put(None)
        except BaseException as exc:
            ready.put(exc)
        finally:
            chunks.close()

    threading.Thread(target=read, name="backfill-listing", daemon=True).start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Room for the reader's one last put, after which it sees `stop` and ends.
        with contextlib.suppress(queue.Empty):
            ready.get_nowait()
