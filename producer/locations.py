"""Locations: how `s3://bucket/key` and `file:///abs/path` are parsed, bounded and written
in one canonical form, so that two spellings of one object always compare equal.

- `file://` locations are URIs (RFC 8089): percent-decoded, then resolved to the real path
  (symlinks, `.` segments and duplicate slashes gone), and written back as `Path.as_uri()`
  does, which is also how listings and `join` spell them. `..` is refused outright.
- `s3://` locations are literal: the key is everything after the bucket, exactly as S3 lists
  it. `%` is an ordinary key character (S3 keeps `%69n.jpg` and `in.jpg` apart), so nothing
  is decoded and no two spellings name one object. What a store or a proxy in front of it
  could resolve on the way (`.`, `..` and empty segments: `a/../b`, `a//b`) is refused, never
  sent.

Control characters are refused everywhere: a location ends up in logs and in messages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote_to_bytes

from producer.errors import AccessDenied, InvalidRequest

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
# Linux's limits: a whole path (its terminating NUL included) and one name.
PATH_MAX = 4096
NAME_MAX = 255
S3_MAX_KEY_BYTES = 1024
# A longest path with every byte percent-encoded: anything longer cannot be a location.
MAX_LOCATION_LENGTH = len(FILE_SCHEME) + 3 * PATH_MAX
# How much of a refused value a message repeats (a 5 MB location must not be logged whole).
SHOWN_CHARACTERS = 120

# S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, starting and
# ending with a letter or digit; never `..` nor an IP address. Nothing else can smuggle a
# host, port, userinfo or path into a path-style request.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")
# What no string we take may hold: Unicode's control characters (C0, DEL, C1: category Cc)
# and its line and paragraph separators, each of which can end a log line or rewrite a
# terminal; and lone surrogates, which are not text (no UTF-8 encoder, database or log
# stream takes them).
UNSAFE_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str

    @property
    def location(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


def shown(text: str) -> str:
    """`text` for a message: escaped by repr, and cut short when long."""
    if len(text) <= SHOWN_CHARACTERS:
        return repr(text)
    return f"{text[:SHOWN_CHARACTERS]!r}… ({len(text)} characters)"


def unsafe_character(text: str) -> str | None:
    """The first control character or lone surrogate in `text`, if any."""
    found = UNSAFE_CHARACTERS.search(text)
    return found.group() if found else None


def check_printable(text: str, what: str) -> None:
    character = unsafe_character(text)
    if character is not None:
        raise InvalidRequest(
            f"{what} contains {character!r}: control characters and lone surrogates are not allowed"
        )


def canonical(location: str) -> str:
    """The one spelling of the object `location` names; InvalidRequest (or AccessDenied for
    `..`) if it is malformed, too long, or of another scheme."""
    if location.startswith(S3_SCHEME):
        return parse_s3(location).location
    if location.startswith(FILE_SCHEME):
        return real_path(location).as_uri()
    raise unsupported(location)


def unsupported(location: str) -> InvalidRequest:
    """The error for a location of no scheme we serve (never fetched: no SSRF)."""
    _check_bounds(location)
    return InvalidRequest(
        f"unsupported location {shown(location)}: use s3://bucket/key or file:///absolute/path"
    )


def canonical_prefix(prefix: str) -> str:
    """A prefix location (for outputs under it) in canonical form, without a trailing slash."""
    if prefix.startswith(FILE_SCHEME):
        return real_path(prefix, prefix=True).as_uri()
    if prefix.startswith(S3_SCHEME):
        return parse_s3(prefix, prefix=True).location.rstrip("/")
    raise unsupported(prefix)


def parse_s3(location: str, *, prefix: bool = False) -> S3Object:
    """Bucket and key of an S3 location; with `prefix`, a key may be empty or end in `/`."""
    _check_bounds(location)
    bucket, _, key = location[len(S3_SCHEME) :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP_ADDRESS.fullmatch(bucket):
        raise InvalidRequest(
            f"malformed S3 location {shown(location)}: bad bucket name (S3's rules: 3-63 "
            "lowercase letters, digits, dots and hyphens)"
        )
    if not key and not prefix:
        raise InvalidRequest(f"malformed S3 location {shown(location)}: no key")
    if len(key.encode()) > S3_MAX_KEY_BYTES:
        raise InvalidRequest(
            f"malformed S3 location {shown(location)}: the key is longer than "
            f"{S3_MAX_KEY_BYTES} bytes"
        )
    segments = key.split("/")
    if prefix:
        segments = segments[:-1] if segments[-1] == "" else segments
    if ".." in segments:
        raise AccessDenied(f"{shown(location)}: '..' is not allowed in S3 keys")
    if "." in segments or "" in segments:
        raise InvalidRequest(
            f"malformed S3 location {shown(location)}: a key must not have empty or '.' "
            "segments (a store or proxy could resolve them to another key)"
        )
    return S3Object(bucket, key)


def parse_file(location: str, *, prefix: bool = False) -> PurePosixPath:
    """The decoded absolute path of a file location, before symlinks are resolved."""
    _check_bounds(location)
    rest = location[len(FILE_SCHEME) :]
    if not rest.startswith("/"):
        # file://host/… names another machine; only the empty host (file:///) is local.
        raise InvalidRequest(
            f"malformed file location {shown(location)}: use file:///absolute/path"
        )
    try:
        decoded = unquote_to_bytes(rest).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"malformed file location {shown(location)}: not UTF-8") from None
    check_printable(decoded, f"file location {shown(location)}")
    if decoded.endswith("/") and not prefix:
        raise InvalidRequest(f"{shown(location)} names a folder, not a file")
    path = PurePosixPath(decoded)
    if ".." in path.parts:
        raise AccessDenied(f"{shown(location)}: '..' is not allowed in file locations")
    check_path_length(str(path), location)
    return path


def real_path(location: str, *, prefix: bool = False) -> Path:
    """The real path a file location names: symlinks along it followed, bounds checked."""
    real = Path(os.path.realpath(parse_file(location, prefix=prefix)))
    check_path_length(str(real), location)
    return real


def check_path_length(path: str, location: str) -> None:
    encoded = os.fsencode(path)
    if len(encoded) >= PATH_MAX:
        raise InvalidRequest(f"{shown(location)}: the path is longer than {PATH_MAX - 1} bytes")
    if any(len(name) > NAME_MAX for name in encoded.split(b"/")):
        raise InvalidRequest(
            f"{shown(location)}: a name in the path is longer than {NAME_MAX} bytes"
        )


def _check_bounds(location: str) -> None:
    if not isinstance(location, str):
        raise InvalidRequest(f"a location must be a string, got {type(location).__name__}")
    if len(location) > MAX_LOCATION_LENGTH:
        raise InvalidRequest(
            f"location {shown(location)} is longer than {MAX_LOCATION_LENGTH} characters"
        )
    check_printable(location, f"location {shown(location)}")
