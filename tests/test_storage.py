"""Storage against a real S3 HTTP endpoint (moto's server) and real directories."""

from __future__ import annotations

import errno
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from producer.errors import (
    AccessDenied,
    InputNotFound,
    InputTooLarge,
    InvalidRequest,
    StorageUnavailable,
    UnsupportedFormat,
)
from producer.settings import Settings
from producer.storage import (
    TEMP_PREFIX,
    Storage,
    _translate,
    content_type_for,
    join,
    os_error,
)
from tests.support.network import free_port

PHOTO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_bytes(b"not yours")
    return path


def make_storage(root: Path, endpoint: str | None = None, **overrides: Any) -> Storage:
    return Storage(
        Settings(
            data_dir=root.parent, s3_endpoint_url=endpoint, local_roots=[str(root)], **overrides
        )
    )


@pytest.fixture
def storage(root: Path, s3_server: str) -> Storage:
    return make_storage(root, s3_server)


@pytest.fixture
def s3(s3_server: str) -> Any:
    return boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1")


# --- round trips -------------------------------------------------------------------------


def test_s3_write_then_read_returns_the_same_bytes_with_content_type(
    storage: Storage, s3: Any, s3_bucket: str
) -> None:
    location = f"s3://{s3_bucket}/out/photo one.png"
    storage.write(location, PHOTO, content_type="image/png")

    assert storage.read(location) == PHOTO
    stored = s3.head_object(Bucket=s3_bucket, Key="out/photo one.png")
    assert stored["ContentType"] == "image/png"
    info = storage.head(location)
    assert (info.location, info.size) == (location, len(PHOTO))
    assert info.etag == hashlib.md5(PHOTO).hexdigest()


def test_file_write_creates_parent_directories_and_reads_back(storage: Storage, root: Path) -> None:
    location = join(root.as_uri(), "a/b/photo 1%.png")
    storage.write(location, PHOTO, content_type="image/png")

    assert (root / "a" / "b" / "photo 1%.png").read_bytes() == PHOTO
    assert storage.read(location) == PHOTO
    info = storage.head(location)
    assert info.size == len(PHOTO)
    assert info.location == location


def test_file_etag_changes_when_the_file_is_rewritten(storage: Storage, root: Path) -> None:
    location = join(root.as_uri(), "photo.png")
    storage.write(location, PHOTO, content_type="image/png")
    before = storage.head(location).etag
    storage.write(location, PHOTO + b"more", content_type="image/png")

    assert storage.head(location).etag != before


def test_atomic_file_write_replaces_the_file_and_leaves_no_temporary_files(
    storage: Storage, root: Path
) -> None:
    location = join(root.as_uri(), "out/photo.png")
    storage.write(location, b"first", content_type="image/png")
    storage.write(location, PHOTO, content_type="image/png")

    assert os.listdir(root / "out") == ["photo.png"]
    assert (root / "out" / "photo.png").read_bytes() == PHOTO


def test_failed_file_write_cleans_up_its_temporary_file(storage: Storage, root: Path) -> None:
    (root / "out" / "taken").mkdir(parents=True)

    with pytest.raises(InvalidRequest):
        storage.write(join(root.as_uri(), "out/taken"), PHOTO, content_type="image/png")
    assert os.listdir(root / "out") == ["taken"]


def test_upload_file_and_download_file_round_trip_through_s3(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    source = tmp_path / "weights.pth"
    source.write_bytes(PHOTO * 10)
    location = f"s3://{s3_bucket}/models/weights.pth"

    storage.upload_file(source, location)
    target = tmp_path / "cache" / "hub" / "weights.pth"
    storage.download_file(location, target)

    assert target.read_bytes() == source.read_bytes()


def test_upload_file_and_download_file_round_trip_through_files(
    storage: Storage, root: Path, tmp_path: Path
) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(PHOTO)
    location = join(root.as_uri(), "inputs/photo.png")

    storage.upload_file(source, location)
    target = tmp_path / "cache" / "copy.png"
    storage.download_file(location, target)

    assert (root / "inputs" / "photo.png").read_bytes() == PHOTO
    assert target.read_bytes() == PHOTO


def test_upload_of_a_missing_local_file_is_input_not_found(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    with pytest.raises(InputNotFound):
        storage.upload_file(tmp_path / "nope.png", f"s3://{s3_bucket}/nope.png")


# --- missing objects ---------------------------------------------------------------------


def test_missing_s3_key_is_input_not_found(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    location = f"s3://{s3_bucket}/missing.png"
    for call in (storage.read, storage.head):
        with pytest.raises(InputNotFound) as raised:
            call(location)
        assert raised.value.code == "input_not_found"
    with pytest.raises(InputNotFound):
        storage.download_file(location, tmp_path / "never-written")
    assert os.listdir(tmp_path) == ["root"]


def test_missing_bucket_is_input_not_found_naming_the_bucket(storage: Storage) -> None:
    with pytest.raises(InputNotFound, match="no-such-bucket-here"):
        storage.read("s3://no-such-bucket-here/photo.png")
    with pytest.raises(InputNotFound, match="no-such-bucket-here"):
        storage.write("s3://no-such-bucket-here/out.png", PHOTO, content_type="image/png")


def test_missing_file_is_input_not_found(storage: Storage, root: Path) -> None:
    location = join(root.as_uri(), "missing/photo.png")
    for call in (storage.read, storage.head):
        with pytest.raises(InputNotFound):
            call(location)


# --- allow-list and confinement ----------------------------------------------------------


def test_bucket_outside_the_allow_list_is_denied_for_every_operation(
    root: Path, s3_server: str, s3: Any, s3_bucket: str
) -> None:
    s3.put_object(Bucket=s3_bucket, Key="photo.png", Body=PHOTO)
    storage = make_storage(root, s3_server, allowed_buckets="some-other-bucket")
    location = f"s3://{s3_bucket}/photo.png"

    for call in (
        lambda: storage.read(location),
        lambda: storage.head(location),
        lambda: storage.write(f"s3://{s3_bucket}/new.png", PHOTO, content_type="image/png"),
        lambda: storage.list(f"s3://{s3_bucket}/"),
        lambda: storage.check_allowed(location),
    ):
        with pytest.raises(AccessDenied) as raised:
            call()
        assert raised.value.code == "access_denied"
    listed = s3.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [item["Key"] for item in listed] == ["photo.png"]


def test_bucket_in_the_allow_list_is_usable(root: Path, s3_server: str, s3_bucket: str) -> None:
    storage = make_storage(root, s3_server, allowed_buckets=f"other,{s3_bucket}")
    storage.write(f"s3://{s3_bucket}/ok.png", PHOTO, content_type="image/png")

    assert storage.read(f"s3://{s3_bucket}/ok.png") == PHOTO


def test_file_outside_the_roots_is_denied_for_read_and_write(
    storage: Storage, outside: Path
) -> None:
    with pytest.raises(AccessDenied):
        storage.read((outside / "secret.txt").as_uri())
    with pytest.raises(AccessDenied):
        storage.write((outside / "new.png").as_uri(), PHOTO, content_type="image/png")
    assert sorted(os.listdir(outside)) == ["secret.txt"]


@pytest.mark.parametrize("tail", ["../outside/secret.txt", "sub/../photo.png", "%2e%2e/x.png"])
def test_dot_dot_in_a_file_location_is_denied(storage: Storage, root: Path, tail: str) -> None:
    with pytest.raises(AccessDenied):
        storage.read(f"{root.as_uri()}/{tail}")
    with pytest.raises(AccessDenied):
        storage.write(f"{root.as_uri()}/{tail}", PHOTO, content_type="image/png")


def test_symlinks_pointing_outside_the_root_are_denied(
    storage: Storage, root: Path, outside: Path
) -> None:
    (root / "secret-link").symlink_to(outside / "secret.txt")
    (root / "dir-link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(AccessDenied):
        storage.read((root / "secret-link").as_uri())
    with pytest.raises(AccessDenied):
        storage.write((root / "secret-link").as_uri(), PHOTO, content_type="image/png")
    with pytest.raises(AccessDenied):
        storage.write((root / "dir-link" / "new.png").as_uri(), PHOTO, content_type="image/png")
    assert (outside / "secret.txt").read_bytes() == b"not yours"
    assert sorted(os.listdir(outside)) == ["secret.txt"]


def test_root_configured_through_a_symlink_is_compared_by_real_path(
    root: Path, tmp_path: Path
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    storage = make_storage(alias)
    (root / "photo.png").write_bytes(PHOTO)

    assert storage.read((root / "photo.png").as_uri()) == PHOTO
    assert storage.read((alias / "photo.png").as_uri()) == PHOTO


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1:9/photo.png",
        "https://example.com/photo.png",
        "ftp://example.com/photo.png",
        "gs://bucket/photo.png",
        "/etc/passwd",
        "relative/photo.png",
        "file://otherhost/etc/passwd",
        "s3://",
        "s3://bucket-without-key",
        "s3://bad@host:1/x",
    ],
)
def test_other_schemes_and_malformed_locations_are_invalid_requests(
    storage: Storage, location: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        storage.read(location)
    assert raised.value.code == "invalid_request"
    with pytest.raises(InvalidRequest):
        storage.check_allowed(location)


# --- size limits -------------------------------------------------------------------------


def test_max_bytes_is_enforced_for_s3(storage: Storage, s3_bucket: str) -> None:
    location = f"s3://{s3_bucket}/photo.png"
    storage.write(location, PHOTO, content_type="image/png")

    assert storage.read(location, max_bytes=len(PHOTO)) == PHOTO
    with pytest.raises(InputTooLarge) as raised:
        storage.read(location, max_bytes=len(PHOTO) - 1)
    assert raised.value.code == "input_too_large"


def test_max_bytes_is_enforced_for_files(storage: Storage, root: Path) -> None:
    (root / "photo.png").write_bytes(PHOTO)
    location = (root / "photo.png").as_uri()

    assert storage.read(location, max_bytes=len(PHOTO)) == PHOTO
    with pytest.raises(InputTooLarge):
        storage.read(location, max_bytes=len(PHOTO) - 1)


# --- listing -----------------------------------------------------------------------------


@pytest.mark.slow  # a thousand PUTs: S3's own page boundary, not just ours
def test_s3_list_pages_through_more_than_1000_keys_in_key_order_with_etags(
    storage: Storage, s3: Any, s3_bucket: str
) -> None:
    keys = [f"photos/{i:05d}.png" for i in range(1003)]

    def put(key: str) -> None:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, reversed(keys)))
    s3.put_object(Bucket=s3_bucket, Key="other/x.png", Body=b"x")

    listed = list(storage.list(f"s3://{s3_bucket}/photos/"))

    assert [info.location for info in listed] == [f"s3://{s3_bucket}/{key}" for key in keys]
    assert all(
        info.etag == hashlib.md5(info.location.split("/", 3)[3].encode()).hexdigest()
        for info in listed
    )
    assert all(info.size == len("photos/00000.png") for info in listed)


def test_s3_list_with_a_small_page_size_returns_every_key_once(
    storage: Storage, s3: Any, s3_bucket: str
) -> None:
    keys = sorted(f"in/{name}.png" for name in ("b", "a", "c-1", "c/0", "d", "e", "f", "g"))
    for key in keys:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"1")

    listed = [info.location for info in storage.list(f"s3://{s3_bucket}/in/", page_size=3)]

    assert listed == [f"s3://{s3_bucket}/{key}" for key in keys]


def test_s3_list_can_start_after_a_location_for_a_resumed_listing(
    storage: Storage, s3: Any, s3_bucket: str
) -> None:
    keys = sorted(f"in/{name}.png" for name in ("a", "b", "c/0", "c/1", "d"))
    for key in keys:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"1")
    s3.put_object(Bucket=s3_bucket, Key="zz/after-the-prefix.png", Body=b"1")
    prefix = f"s3://{s3_bucket}/in/"

    listed = [
        info.location for info in storage.list(prefix, page_size=2, start_after=f"{prefix}c/0.png")
    ]

    assert listed == [f"s3://{s3_bucket}/in/c/1.png", f"s3://{s3_bucket}/in/d.png"]


def test_file_list_can_start_after_a_location(storage: Storage, root: Path) -> None:
    for name in ("a.png", "b/x.png", "b/y.png", "c.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"1")

    listed = storage.list(root.as_uri() + "/", start_after=(root / "b/x.png").as_uri())

    assert [info.location for info in listed] == [
        (root / "b/y.png").as_uri(),
        (root / "c.png").as_uri(),
    ]


def test_file_list_walks_the_tree_in_key_order_skipping_symlinks_and_temporary_files(
    storage: Storage, root: Path, outside: Path
) -> None:
    for name in ("b.png", "a-b.png", "a/x.png", "a/y/z.png", "a.png", "c/d.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    (root / f"{TEMP_PREFIX}half.tmp").write_bytes(b"half")
    (root / "link.png").symlink_to(outside / "secret.txt")
    (root / "outlink").symlink_to(outside, target_is_directory=True)

    listed = list(storage.list(root.as_uri() + "/"))

    names = [info.location.removeprefix(root.as_uri() + "/") for info in listed]
    assert names == ["a-b.png", "a.png", "a/x.png", "a/y/z.png", "b.png", "c/d.png"]
    assert names == sorted(names)
    assert [info.size for info in listed] == [len(name) for name in names]
    assert all(info.etag == storage.head(info.location).etag for info in listed)


def test_file_list_with_a_partial_name_prefix_matches_like_s3(storage: Storage, root: Path) -> None:
    for name in ("photo-1.png", "photo-2.png", "other.png"):
        (root / name).write_bytes(b"1")

    listed = [info.location for info in storage.list(root.as_uri() + "/photo-")]

    assert listed == [(root / "photo-1.png").as_uri(), (root / "photo-2.png").as_uri()]


def test_file_list_outside_the_roots_is_denied(storage: Storage, outside: Path) -> None:
    with pytest.raises(AccessDenied):
        storage.list(outside.as_uri() + "/")


# --- infrastructure failures -------------------------------------------------------------


def test_unreachable_endpoint_is_storage_unavailable(root: Path, s3_server: str) -> None:
    # s3_server only for its session credentials: the closed port is what is under test.
    closed = f"http://127.0.0.1:{free_port()}"
    storage = make_storage(root, closed, s3_connect_timeout_s=0.5, s3_max_attempts=1)

    with pytest.raises(StorageUnavailable) as raised:
        storage.read("s3://bucket/photo.png")

    assert raised.value.code == "storage_unavailable"
    assert raised.value.retryable
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in raised.value.message


def _client_error(code: str, status: int) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "store says no"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, AccessDenied),
        ("403", 403, AccessDenied),
        ("NoSuchKey", 404, InputNotFound),
        ("NoSuchBucket", 404, InputNotFound),
        ("InternalError", 500, StorageUnavailable),
        ("SlowDown", 503, StorageUnavailable),
        ("InvalidArgument", 400, InvalidRequest),
    ],
)
def test_store_error_responses_map_to_error_codes(code: str, status: int, expected: type) -> None:
    assert isinstance(_translate(_client_error(code, status), "s3://b/k"), expected)


# --- helpers -----------------------------------------------------------------------------


def test_join_handles_a_trailing_slash_and_quotes_file_names() -> None:
    assert join("s3://bucket/out", "a.png") == "s3://bucket/out/a.png"
    assert join("s3://bucket/out/", "a.png") == "s3://bucket/out/a.png"
    assert join("s3://bucket", "a b.png") == "s3://bucket/a b.png"
    assert join("file:///data/out/", "a b.png") == "file:///data/out/a%20b.png"


def test_content_type_for_knows_the_output_formats() -> None:
    assert content_type_for("png") == "image/png"
    assert content_type_for("jpeg") == "image/jpeg"
    assert content_type_for("webp") == "image/webp"
    with pytest.raises(UnsupportedFormat):
        content_type_for("gif")


# --- internal state, canonical keys, OS errors -------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The embedded default's data dir: a SQLite database, a broker folder, user folders."""
    data = tmp_path / "data"
    for folder in ("inputs", "outputs", "broker/queue"):
        (data / folder).mkdir(parents=True)
    for name in ("backdrop.db", "backdrop.db-wal", "broker/queue/message.msg"):
        (data / name).write_bytes(b"internal")
    (data / "inputs" / "photo.png").write_bytes(PHOTO)
    return data


def test_by_default_only_the_data_dirs_inputs_and_outputs_are_reachable(data_dir: Path) -> None:
    storage = Storage(Settings(data_dir=data_dir))
    assert storage.read((data_dir / "inputs" / "photo.png").as_uri()) == PHOTO
    storage.write((data_dir / "outputs" / "new.png").as_uri(), PHOTO, content_type="image/png")
    for name in ("backdrop.db", "broker/queue/message.msg", "elsewhere.png"):
        with pytest.raises(AccessDenied):
            storage.write((data_dir / name).as_uri(), PHOTO, content_type="image/png")
    assert (data_dir / "backdrop.db").read_bytes() == b"internal"


@pytest.mark.parametrize(
    "name", ["backdrop.db", "backdrop.db-wal", "backdrop.db-shm", "broker/queue/message.msg"]
)
def test_the_database_and_broker_folder_are_refused_even_inside_the_roots(
    data_dir: Path, name: str
) -> None:
    storage = Storage(Settings(data_dir=data_dir, local_roots=[str(data_dir)]))
    location = (data_dir / name).as_uri()
    for call in (
        lambda: storage.read(location),
        lambda: storage.head(location),
        lambda: storage.check_allowed(location),
        lambda: storage.write(location, PHOTO, content_type="image/png"),
    ):
        with pytest.raises(AccessDenied, match="internal state"):
            call()
    assert not (data_dir / name).exists() or (data_dir / name).read_bytes() == b"internal"


def test_a_symlink_to_the_database_is_the_database(data_dir: Path) -> None:
    (data_dir / "outputs" / "innocent.png").symlink_to(data_dir / "backdrop.db")
    storage = Storage(Settings(data_dir=data_dir, local_roots=[str(data_dir)]))
    with pytest.raises(AccessDenied):
        storage.write(
            (data_dir / "outputs" / "innocent.png").as_uri(), PHOTO, content_type="image/png"
        )
    assert (data_dir / "backdrop.db").read_bytes() == b"internal"


def test_a_listing_of_the_data_dir_leaves_out_the_internal_state(data_dir: Path) -> None:
    storage = Storage(Settings(data_dir=data_dir, local_roots=[str(data_dir)]))
    listed = [info.location for info in storage.list(data_dir.as_uri() + "/")]
    assert listed == [(data_dir / "inputs" / "photo.png").as_uri()]


def test_a_database_configured_elsewhere_is_protected_where_it_is(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    database = root / "jobs.sqlite"
    database.write_bytes(b"internal")
    storage = Storage(
        Settings(data_dir=tmp_path, database_url=f"sqlite:///{database}", local_roots=[str(root)])
    )
    with pytest.raises(AccessDenied):
        storage.write(database.as_uri(), PHOTO, content_type="image/png")


def test_the_model_weights_are_no_jobs_output_but_the_worker_still_fetches_them(
    root: Path, tmp_path: Path
) -> None:
    weights = root / "weights.pth"
    weights.write_bytes(b"state dict")
    storage = make_storage(root, weights=str(weights))
    with pytest.raises(AccessDenied):
        storage.write(weights.as_uri(), PHOTO, content_type="image/png")
    storage.download_file(weights.as_uri(), tmp_path / "cache" / "weights.pth")
    assert (tmp_path / "cache" / "weights.pth").read_bytes() == b"state dict"


def test_weights_in_a_bucket_are_no_jobs_output(root: Path, s3_server: str) -> None:
    storage = make_storage(root, s3_server, weights="s3://models/deeplab.pth")
    with pytest.raises(AccessDenied):
        storage.check_allowed("s3://models/deeplab.pth")


@pytest.mark.parametrize("key", ["a/../b.png", "a/./b.png", "a//b.png", "../other/b.png"])
def test_s3_keys_with_dot_or_empty_segments_are_never_sent(root: Path, key: str) -> None:
    # A closed port: a request that went out would be storage_unavailable, not a refusal.
    storage = make_storage(root, f"http://127.0.0.1:{free_port()}", s3_max_attempts=1)
    for call in (
        lambda: storage.read(f"s3://bucket/{key}"),
        lambda: storage.write(f"s3://bucket/{key}", PHOTO, content_type="image/png"),
    ):
        with pytest.raises((AccessDenied, InvalidRequest)):
            call()


def test_an_s3_key_over_1024_bytes_is_refused_before_it_is_sent(root: Path) -> None:
    storage = make_storage(root, f"http://127.0.0.1:{free_port()}", s3_max_attempts=1)
    with pytest.raises(InvalidRequest, match="1024 bytes"):
        storage.read("s3://bucket/" + "k" * 1025)


def test_a_file_location_too_long_for_the_os_is_refused_as_invalid(
    storage: Storage, root: Path
) -> None:
    for tail in ("n" * 256, "d/" * 2100 + "x.png", "%6E" * 300):
        with pytest.raises(InvalidRequest):
            storage.write(f"{root.as_uri()}/{tail}", PHOTO, content_type="image/png")


def test_a_symlink_loop_is_a_permanent_error(storage: Storage, root: Path) -> None:
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    with pytest.raises(InvalidRequest):
        storage.read((root / "a").as_uri())


def test_writing_below_a_file_is_a_permanent_error(storage: Storage, root: Path) -> None:
    (root / "photo.png").write_bytes(PHOTO)
    with pytest.raises((InvalidRequest, InputNotFound)) as raised:
        storage.write((root / "photo.png").as_uri() + "/out.png", PHOTO, content_type="image/png")
    assert not raised.value.retryable


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (errno.ENAMETOOLONG, InvalidRequest),
        (errno.ELOOP, InvalidRequest),
        (errno.EINVAL, InvalidRequest),
        (errno.EISDIR, InvalidRequest),
        (errno.EEXIST, InvalidRequest),
        (errno.ENOTDIR, InputNotFound),
        (errno.ENOENT, InputNotFound),
        (errno.EACCES, AccessDenied),
        (errno.EPERM, AccessDenied),
        (errno.EROFS, AccessDenied),
        (errno.EIO, StorageUnavailable),
        (errno.ENOSPC, StorageUnavailable),
        (errno.EAGAIN, StorageUnavailable),
        (errno.ETIMEDOUT, StorageUnavailable),
    ],
)
def test_os_errors_are_permanent_or_transient_by_what_they_mean(
    number: int, expected: type
) -> None:
    error = os_error(OSError(number, os.strerror(number)), "file:///data/x.png")
    assert type(error) is expected
    assert error.retryable == (expected is StorageUnavailable)
