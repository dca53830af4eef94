"""Object storage: one interface over `s3://bucket/key` and confined `file:///abs/path` locations.

S3 means any S3-compatible store (AWS, MinIO, SeaweedFS, …) at `Settings.s3_endpoint_url`,
addressed path-style and authenticated by the standard AWS credential variables. Local files are
confined to `Settings.local_roots` by real path, so neither `..` nor a symlink can escape them.
No other scheme is ever fetched: a location is user input, and an http:// reader would be an
SSRF hole.
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import quote

from sqlalchemy.engine import make_url

from producer.errors import (
    AccessDenied,
    BackdropError,
    InputNotFound,
    InputTooLarge,
    InvalidRequest,
    StorageUnavailable,
)
from producer.formats import OutputFormat
from producer.locations import (
    FILE_SCHEME,
    S3_SCHEME,
    S3Object,
    parse_s3,
    real_path,
    shown,
    unsupported,
)
from producer.settings import Settings

if TYPE_CHECKING:
    # Stubs only (boto3-stubs[s3]); boto3 itself is imported on first S3 use.
    from botocore.exceptions import ClientError
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ListObjectsV2RequestPaginateTypeDef

__all__ = ["FILE_SCHEME", "S3_SCHEME", "ObjectInfo", "Storage", "join"]

log = logging.getLogger(__name__)

# Our own half-written files: named so that listings can skip them.
TEMP_PREFIX = ".backdrop-tmp-"
# Job threads of one worker share the client; botocore's default pool of 10 would make them
# queue for (and log warnings about) connections.
S3_MAX_POOL_CONNECTIONS = 32
# SQLite's companions of its database file, which hold committed data too.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

_USERINFO = re.compile(r"://[^/@\s]+@")

_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_DENIED_CODES = {
    "AccessDenied",
    "Forbidden",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
}


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or head returns.

    `etag` is the store's ETag without its quotes for S3. For a file it is
    `<size hex>-<mtime_ns hex>`: no hashing of large files, and it changes whenever the file
    is rewritten (an atomic write always brings a new mtime), which is what callers use it for.
    """

    location: str
    size: int
    etag: str


def join(prefix: str, name: str) -> str:
    """The location of `name` under the prefix location (with or without a trailing slash)."""
    name = name.lstrip("/")
    if prefix.startswith(FILE_SCHEME):
        # file:// locations are URIs: a space or % in a file name must survive the round trip.
        name = quote(name, safe="/")
    return prefix + name if prefix.endswith("/") else f"{prefix}/{name}"


def content_type_for(fmt: str) -> str:
    """An output format's content type (unsupported_format for any other name)."""
    return OutputFormat.of(fmt).content_type


def _redact(text: str) -> str:
    return _USERINFO.sub("://***@", text)


def _within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


@dataclass(frozen=True)
class _Internal:
    """What Backdrop keeps for itself and no job may read or write, whatever the roots: the
    SQLite database and its companions, the broker folder, the model weights (a PNG written
    over any of them stops every process)."""

    files: frozenset[Path]
    folders: tuple[Path, ...]
    weights: frozenset[Path]
    objects: frozenset[str]

    @classmethod
    def of(cls, settings: Settings) -> _Internal:
        files: set[Path] = set()
        weights: set[Path] = set()
        objects: set[str] = set()
        if settings.database_url.startswith("sqlite"):
            database = make_url(settings.database_url).database
            if database and database != ":memory:":
                real = Path(os.path.realpath(database))
                files.add(real)
                files.update(real.with_name(real.name + end) for end in SQLITE_COMPANIONS)
        if settings.weights and settings.weights.startswith(S3_SCHEME):
            objects.add(settings.weights)
        elif settings.weights:
            weights.add(Path(os.path.realpath(settings.weights)))
        folders = (Path(os.path.realpath(settings.broker_folder)),)
        return cls(frozenset(files), folders, frozenset(weights), frozenset(objects))

    def holds(self, real: Path, *, weights_ok: bool = False) -> bool:
        if real in self.weights and not weights_ok:
            return True
        return real in self.files or any(_within(real, folder) for folder in self.folders)


def _file_etag(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


class Storage:
    """Reads and writes locations; every call enforces the bucket allow-list and local roots."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._allowed_buckets = frozenset(settings.allowed_buckets)
        self._roots = tuple(Path(os.path.realpath(root)) for root in settings.local_roots)
        self._internal = _Internal.of(settings)
        self._client_lock = threading.Lock()
        self._client_instance: S3Client | None = None

    # --- public interface ----------------------------------------------------------------

    def check_allowed(self, location: str) -> None:
        """Raise AccessDenied or InvalidRequest unless this process may touch `location`."""
        self._resolve(location, prefix=False)

    def read(self, location: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes; InputNotFound if missing, InputTooLarge past `max_bytes`."""
        target = self._resolve(location, prefix=False)
        if isinstance(target, S3Object):
            return self._s3_read(target, max_bytes)
        return _file_read(location, target, max_bytes)

    def write(self, location: str, data: bytes | IO[bytes], *, content_type: str) -> None:
        """Store bytes, or a seekable file's contents (copied, never read whole)."""
        target = self._resolve(location, prefix=False)
        if isinstance(target, S3Object):
            with self._s3_errors(target.location):
                self._client.put_object(
                    Bucket=target.bucket, Key=target.key, Body=data, ContentType=content_type
                )
            return
        with _file_errors(location):
            if isinstance(data, bytes):
                _write_atomically(target, lambda out: out.write(data))
            else:
                _write_atomically(target, lambda out: shutil.copyfileobj(data, out))

    def stream(self, location: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks, to serve it without holding it whole. Opened here,
        so a missing object is InputNotFound before the first chunk is asked for."""
        target = self._resolve(location, prefix=False)
        source: IO[bytes] | StreamingBody
        if isinstance(target, S3Object):
            with self._s3_errors(target.location):
                source = self._client.get_object(Bucket=target.bucket, Key=target.key)["Body"]
        else:
            with _file_errors(location):
                source = target.open("rb")
        return _chunks(source, chunk_bytes)

    def presigned_url(self, location: str, expires_s: int) -> str | None:
        """A GET URL that reads an S3 object without credentials until it expires (computed
        locally, no request); None for a file location."""
        target = self._resolve(location, prefix=False)
        if not isinstance(target, S3Object):
            return None
        with self._s3_errors(target.location):
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": target.bucket, "Key": target.key},
                ExpiresIn=expires_s,
            )

    def head(self, location: str) -> ObjectInfo:
        target = self._resolve(location, prefix=False)
        if isinstance(target, S3Object):
            with self._s3_errors(target.location):
                response = self._client.head_object(Bucket=target.bucket, Key=target.key)
            return ObjectInfo(
                location=target.location,
                size=int(response["ContentLength"]),
                etag=response.get("ETag", "").strip('"'),
            )
        with _file_errors(location):
            st = target.stat()
        if not stat.S_ISREG(st.st_mode):
            raise InputNotFound(f"{location} is not a file")
        return ObjectInfo(location=target.as_uri(), size=st.st_size, etag=_file_etag(st))

    def exists(self, location: str) -> bool:
        try:
            self.head(location)
        except InputNotFound:
            return False
        return True

    def list(
        self, prefix: str, *, page_size: int = 1000, start_after: str | None = None
    ) -> Iterator[ObjectInfo]:
        """Objects whose location starts with `prefix`, sorted by key, fetched page by page;
        with `start_after` (a location), only those after it, so a resumed backfill of
        millions of objects does not list again what it has done (S3 starts there).

        A file prefix that names a directory lists that directory's tree; otherwise it matches
        file names in its parent directory that start with its last part. Symlinks are skipped:
        following them could leave the roots or loop.
        """
        target = self._resolve(prefix, prefix=True)
        if isinstance(target, S3Object):
            listing = self._s3_list(target, page_size, start_after)
        else:
            listing = self._file_list(prefix, target)
        if start_after is None:
            return listing
        return (info for info in listing if info.location > start_after)

    def download_file(self, location: str, path: Path) -> None:
        """Stream an object into a local file (model weights: large, so never held in memory)."""
        target = self._resolve(location, prefix=False, weights_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(target, S3Object):
            # boto3 downloads into a temporary name and renames it on success.
            with self._s3_errors(target.location):
                self._client.download_file(target.bucket, target.key, str(path))
            return
        with _file_errors(location), target.open("rb") as source:
            _write_atomically(path, lambda out: shutil.copyfileobj(source, out))

    def upload_file(self, path: Path, location: str) -> None:
        """Upload a plain local file (given to the CLI) to a location."""
        target = self._resolve(location, prefix=False, weights_ok=True)
        if not path.is_file():
            raise InputNotFound(f"{path} is not a file")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if isinstance(target, S3Object):
            with self._s3_errors(target.location):
                self._client.upload_file(
                    str(path), target.bucket, target.key, ExtraArgs={"ContentType": content_type}
                )
            return
        with _file_errors(location), path.open("rb") as source:
            _write_atomically(target, lambda out: shutil.copyfileobj(source, out))

    # --- locations and confinement -------------------------------------------------------

    def _resolve(self, location: str, *, prefix: bool, weights_ok: bool = False) -> S3Object | Path:
        """The object `location` names, if this process may touch it. `weights_ok`: for the
        operator's file transfers (fetching and pushing the model weights), never a job's."""
        if not isinstance(location, str):
            raise InvalidRequest(f"a location must be a string, got {type(location).__name__}")
        if location.startswith(S3_SCHEME):
            target = parse_s3(location, prefix=prefix)
            if self._allowed_buckets and target.bucket not in self._allowed_buckets:
                raise AccessDenied(f"bucket {target.bucket!r} is not in the allowed buckets")
            if target.location in self._internal.objects and not weights_ok:
                raise AccessDenied(f"{shown(location)} holds Backdrop's model weights")
            return target
        if location.startswith(FILE_SCHEME):
            # The real path: symlinks anywhere along it are followed before the roots compare.
            real = real_path(location, prefix=prefix)
            if not any(_within(real, root) for root in self._roots):
                raise AccessDenied(f"{shown(location)} is outside the allowed local roots")
            if self._internal.holds(real, weights_ok=weights_ok):
                raise AccessDenied(
                    f"{shown(location)} is Backdrop's internal state (its database, broker "
                    "folder or model weights); use a location of your own"
                )
            return real
        raise unsupported(location)

    # --- S3 ------------------------------------------------------------------------------

    @property
    def _client(self) -> S3Client:
        # Built on first S3 use (the embedded default never needs it), once per Storage:
        # clients are thread-safe, building one is not cheap, and sessions are not thread-safe.
        with self._client_lock:
            if self._client_instance is None:
                self._client_instance = _build_client(self._settings)
            return self._client_instance

    @contextmanager
    def _s3_errors(self, location: str) -> Iterator[None]:
        try:
            yield
        except BackdropError:
            raise
        except Exception as exc:
            error = _translate(exc, location)
            log.debug("S3 call for %s failed: %s", location, error)
            raise error from None

    def _s3_read(self, target: S3Object, max_bytes: int | None) -> bytes:
        with self._s3_errors(target.location):
            response = self._client.get_object(Bucket=target.bucket, Key=target.key)
            body = response["Body"]
            try:
                size = response.get("ContentLength")
                # The headers say how big it is: refuse before a byte of the body moves.
                if max_bytes is not None and size is not None and size > max_bytes:
                    raise _too_large(target.location, size, max_bytes)
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
            finally:
                body.close()
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large(target.location, len(data), max_bytes)
        return data

    def _s3_list(
        self, target: S3Object, page_size: int, start_after: str | None
    ) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        bucket_prefix = f"{S3_SCHEME}{target.bucket}/"
        request: ListObjectsV2RequestPaginateTypeDef = {
            "Bucket": target.bucket,
            "Prefix": target.key,
            "PaginationConfig": {"PageSize": page_size},
        }
        if start_after is not None and start_after.startswith(bucket_prefix):
            request["StartAfter"] = start_after.removeprefix(bucket_prefix)
        pages = paginator.paginate(**request)
        with self._s3_errors(f"{S3_SCHEME}{target.bucket}/{target.key}"):
            # S3 returns keys in UTF-8 binary order, which is the order promised here.
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        location=f"{S3_SCHEME}{target.bucket}/{item['Key']}",
                        size=int(item["Size"]),
                        etag=item.get("ETag", "").strip('"'),
                    )

    # --- files ---------------------------------------------------------------------------

    def _file_list(self, prefix: str, target: Path) -> Iterator[ObjectInfo]:
        names_a_directory = prefix.endswith("/") or target.is_dir()
        start = target if names_a_directory else target.parent
        match = f"{target}/" if names_a_directory else str(target)
        if not any(_within(start, root) for root in self._roots):
            return
        with _file_errors(prefix):
            yield from _walk_sorted(start, match, self._internal.holds)


def _build_client(settings: Settings) -> S3Client:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.s3_region,
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        # botocore's `max_attempts` counts retries only; `total_max_attempts` includes the
        # first try, which is what Settings.s3_max_attempts promises.
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        max_pool_connections=S3_MAX_POOL_CONNECTIONS,
        # Path-style: MinIO and SeaweedFS behind a plain host name have no per-bucket DNS.
        s3={"addressing_style": "path"},
        # botocore >= 1.36 adds CRC checksums to every upload by default; several
        # S3-compatible stores reject or mishandle them. Only send them where S3 requires.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # boto3.client() goes through the default session, which is not thread-safe to build.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=config)


def _chunks(source: IO[bytes] | StreamingBody, size: int) -> Iterator[bytes]:
    try:
        while chunk := source.read(size):
            yield chunk
    finally:
        source.close()


def _too_large(location: str, size: int, max_bytes: int) -> InputTooLarge:
    return InputTooLarge(f"{location} is {size} bytes; the limit is {max_bytes}")


def _translate(exc: BaseException, location: str) -> BackdropError:
    """Map a boto3/botocore failure to our error codes (messages never carry credentials)."""
    from boto3.exceptions import RetriesExceededError, S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(exc, S3UploadFailedError | S3TransferFailedError):
        # s3transfer wraps the ClientError that says what actually went wrong.
        cause = exc.__cause__ or exc.__context__
        if cause is not None and cause is not exc:
            return _translate(cause, location)
    if isinstance(exc, ClientError):
        return _translate_client_error(exc, location)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AccessDenied(
            f"{location}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(f"{location}: {_redact(str(exc))}")
    if isinstance(exc, RetriesExceededError):
        return StorageUnavailable(f"{location}: transfer failed after retries")
    # Connection refused, timeouts, a connection cut mid-body, …: the store may come back.
    return StorageUnavailable(
        f"{location}: S3 unreachable ({type(exc).__name__}: {_redact(str(exc))})"
    )


def _translate_client_error(exc: ClientError, location: str) -> BackdropError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    detail = _redact(str(error.get("Message") or code))
    if code == "NoSuchBucket":
        bucket = location[len(S3_SCHEME) :].partition("/")[0]
        return InputNotFound(f"{location}: bucket {bucket!r} does not exist")
    if code in _NOT_FOUND_CODES or status == 404:
        return InputNotFound(f"{location} does not exist")
    if code in _DENIED_CODES or status == 403:
        return AccessDenied(f"{location}: access denied by the store ({code})")
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return StorageUnavailable(f"{location}: the store failed ({code}: {detail})")
    return InvalidRequest(f"{location}: the store refused the request ({code}: {detail})")


# --- local files -------------------------------------------------------------------------


# What an OS error says about a file location. Anything not named here (EIO, ENOSPC,
# EDQUOT, EAGAIN, ETIMEDOUT, ESTALE, EMFILE, …: a full disk, a flaky mount) is the machine's
# trouble, not the request's, and is retried as storage_unavailable.
_PERMANENT_ERRNOS: dict[int, type[BackdropError]] = {
    errno.ENOENT: InputNotFound,
    errno.ENOTDIR: InputNotFound,
    errno.EISDIR: InvalidRequest,
    # mkdir of a parent that is a file.
    errno.EEXIST: InvalidRequest,
    errno.ENAMETOOLONG: InvalidRequest,
    errno.ELOOP: InvalidRequest,
    errno.EINVAL: InvalidRequest,
    errno.EILSEQ: InvalidRequest,
    errno.EFBIG: InvalidRequest,
    errno.EACCES: AccessDenied,
    errno.EPERM: AccessDenied,
    errno.EROFS: AccessDenied,
}


def os_error(exc: OSError, location: str) -> BackdropError:
    """The error code an OS error on `location` deserves: permanent when retrying the same
    request can only fail the same way, storage_unavailable otherwise."""
    kind = _PERMANENT_ERRNOS.get(exc.errno or 0, StorageUnavailable)
    if kind is InputNotFound:
        return InputNotFound(f"{shown(location)} does not exist")
    reason = exc.strerror or type(exc).__name__
    return kind(f"{shown(location)}: {reason}")


@contextmanager
def _file_errors(location: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise os_error(exc, location) from None


def _file_read(location: str, path: Path, max_bytes: int | None) -> bytes:
    with _file_errors(location), path.open("rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputNotFound(f"{location} is not a file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(location, st.st_size, max_bytes)
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(location, len(data), max_bytes)
    return data


def _write_atomically(target: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same directory, then rename over the target:
    readers see the old file or the new one, never half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp makes the file private; outputs are meant to be read by others.
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _walk_sorted(
    directory: Path, match: str, internal: Callable[[Path], bool]
) -> Iterator[ObjectInfo]:
    """Regular files under `directory` whose path starts with `match`, in key order, leaving
    out our own: temporary files and the `internal` ones.

    Siblings sort by name with a "/" after directory names: exactly the order of the full
    path strings, so the walk stays lazy yet matches S3's lexicographic listing.
    """
    try:
        with os.scandir(directory) as scan:
            entries = sorted(
                scan, key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name
            )
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        path = f"{directory}/{entry.name}" if str(directory) != "/" else f"/{entry.name}"
        if entry.is_symlink() or entry.name.startswith(TEMP_PREFIX) or internal(Path(path)):
            continue
        if entry.is_dir(follow_symlinks=False):
            subtree = path + "/"
            if subtree.startswith(match) or match.startswith(subtree):
                yield from _walk_sorted(Path(path), match, internal)
        elif entry.is_file(follow_symlinks=False) and path.startswith(match):
            st = entry.stat(follow_symlinks=False)
            yield ObjectInfo(location=Path(path).as_uri(), size=st.st_size, etag=_file_etag(st))
