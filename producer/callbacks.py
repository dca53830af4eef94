"""Completion callbacks on the wire: which URLs may be called, the signature, the POST.

A callback URL comes from whoever submits a job, so every delivery is a request the service
makes on a stranger's behalf (SSRF). The rules: https unless the host is listed in
BACKDROP_CALLBACK_ALLOWED_HOSTS; the name is resolved once and every address it has must be
public (not private, loopback, link-local, multicast, reserved or unspecified) unless the
host is listed; the connection goes to the very address that was checked (no second lookup
that a rebinding DNS server could answer differently), with TLS verified against the name;
redirects are never followed.

Receivers verify `Backdrop-Signature` with `verify_signature` (or its dozen lines, copied).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from producer.settings import Settings

SIGNATURE_HEADER = "Backdrop-Signature"
JOB_ID_HEADER = "Backdrop-Job-Id"
MAX_URL_LENGTH = 2048
# A receiver answers with a status line and headers; we read no more of what it sends.
USER_AGENT = "Backdrop-Callback/1"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]


class Refused(Exception):
    """The URL may not be called (scheme, host or address); no connection was made."""


# --- which URLs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path: str  # path and query, as sent in the request line

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """The parts of a callback URL, refusing (Refused) what can never be a callback."""
    if len(url) > MAX_URL_LENGTH:
        raise Refused(f"longer than {MAX_URL_LENGTH} characters")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise Refused("spaces and control characters are not allowed")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise Refused("must start with https:// (or http:// to an allowed host)")
    if parts.username is not None or parts.password is not None:
        raise Refused("must not carry credentials (user:password@); the signature authenticates")
    if parts.fragment:
        raise Refused("must not have a #fragment")
    host = _host(parts)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("has an invalid port") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, path)


def _host(parts: SplitResult) -> str:
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise Refused("has no host")
    if _address(host) is not None:
        return host
    labels = host.split(".")
    valid = all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in label)
        for label in labels
    )
    if not valid or len(host) > 253:
        raise Refused(f"host {host!r} is not a valid name (IDN names: use the xn-- form)")
    return host


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def listed(target: Target, allowed_hosts: Sequence[str]) -> bool:
    """Whether BACKDROP_CALLBACK_ALLOWED_HOSTS names the host (any port) or host:port."""
    for entry in allowed_hosts:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("["):  # [v6] or [v6]:port
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":")
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:
            host, port = entry, ""
        if host == target.host and (not port or port == str(target.port)):
            return True
    return False


def public(address: Address) -> bool:
    """Reachable on the internet: not private, loopback, link-local, multicast, reserved,
    unspecified, nor an IPv6 form of such an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None and not public(embedded):
            return False
    return address.is_global and not (address.is_multicast or address.is_reserved)


def check_url(url: str, settings: Settings) -> Target:
    """Submit-time rules, without a DNS lookup (a name's addresses are checked as each
    delivery connects). Raises Refused with the reason."""
    if settings.callback_secret is None:
        raise Refused(
            "this service has no BACKDROP_CALLBACK_SECRET to sign callbacks with; set it "
            "(on the API and the workers) to use callback_url"
        )
    target = parse_url(url)
    _check_policy(target, settings.callback_allowed_hosts)
    address = _address(target.host)
    if target.host == "localhost" or (address is not None and not public(address)):
        _check_address(target, address or ipaddress.ip_address("127.0.0.1"), settings)
    return target


def _check_policy(target: Target, allowed_hosts: Sequence[str]) -> None:
    if target.scheme == "http" and not listed(target, allowed_hosts):
        raise Refused(
            f"http:// is allowed only to hosts in BACKDROP_CALLBACK_ALLOWED_HOSTS; "
            f"{target.authority} is not listed (use https://)"
        )


def _check_address(target: Target, address: Address, settings: Settings) -> None:
    if not public(address) and not listed(target, settings.callback_allowed_hosts):
        raise Refused(
            f"{target.host} resolves to {address}, a private, loopback, link-local or "
            "reserved address; list the host in BACKDROP_CALLBACK_ALLOWED_HOSTS to allow it"
        )


def system_resolver(host: str, port: int) -> list[str]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc.strerror}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def resolve(target: Target, settings: Settings, resolver: Resolver = system_resolver) -> Address:
    """The one address to connect to, once every address of the name passed the rules: a
    name with any private address is refused whole (a rebinding trick mixes them)."""
    _check_policy(target, settings.callback_allowed_hosts)
    literal = _address(target.host)
    addresses = (
        [literal]
        if literal
        else [ipaddress.ip_address(a) for a in resolver(target.host, target.port)]
    )
    if not addresses:
        raise ConnectionError(f"{target.host} has no address")
    for address in addresses:
        _check_address(target, address, settings)
    return addresses[0]


# --- the signature ------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, as the SPEC says."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance_s: float = 300, *, now: float | None = None
) -> bool:
    """For receivers: True when `header` (the Backdrop-Signature value) signs exactly `body`
    (the raw request bytes, before any JSON parsing) with `secret`, and its timestamp is within
    `tolerance_s` of now (a replayed old delivery fails). Any v1 entry may match."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))


# --- the POST -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def body_of(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), default=str).encode()


def send(
    url: str,
    record: dict[str, Any],
    settings: Settings,
    *,
    resolver: Resolver = system_resolver,
    tls: ssl.SSLContext | None = None,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """POST the signed record once. Never raises for the receiver's faults: a refused URL,
    a connection error, a timeout or a non-2xx are all an Outcome that is not delivered."""
    started = time.monotonic()
    try:
        status = _post(url, record, settings, resolver, tls, clock)
    except Refused as exc:
        return Outcome(None, f"refused: {exc}", _ms(started))
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(None, _describe(exc), _ms(started))
    if 300 <= status < 400:
        return Outcome(status, "redirects are not followed", _ms(started))
    return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}", _ms(started))


def _post(
    url: str,
    record: dict[str, Any],
    settings: Settings,
    resolver: Resolver,
    tls: ssl.SSLContext | None,
    clock: Callable[[], float],
) -> int:
    assert settings.callback_secret is not None, "the delivery loop runs only with a secret"
    target = parse_url(url)
    address = resolve(target, settings, resolver)
    body = body_of(record)
    sock = socket.create_connection(
        (str(address), target.port), timeout=settings.callback_connect_timeout_s
    )
    with _Deadline(sock, settings.callback_timeout_s) as deadline:
        if target.scheme == "https":
            context = tls or ssl.create_default_context()
            deadline.sock = context.wrap_socket(deadline.sock, server_hostname=target.host)
        connection = _Connected(target.host, target.port, deadline.sock)
        connection.request(
            "POST",
            target.path,
            body=body,
            headers={
                "Host": target.authority,
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                JOB_ID_HEADER: str(record.get("id", "")),
                SIGNATURE_HEADER: sign(
                    settings.callback_secret.get_secret_value(), body, int(clock())
                ),
            },
        )
        return connection.getresponse().status


class _Deadline:
    """A hard limit on a whole exchange: socket timeouts bound each recv only, so a receiver
    dripping a byte at a time could otherwise hold a sender thread for ever. When it passes,
    the connection is shut down under the blocked call (by descriptor, which TLS wrapping
    keeps), and the call fails as a timeout."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.expired = False
        sock.settimeout(seconds)
        self._fd = sock.fileno()
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any
    ) -> None:
        with self._lock:  # the descriptor must not be cut once it is closed (and reused)
            self._timer.cancel()
            self.sock.close()
        if self.expired and isinstance(exc, OSError | http.client.HTTPException):
            raise TimeoutError("timed out") from None

    def _cut(self) -> None:
        with self._lock:
            if self.sock.fileno() == -1:
                return
            self.expired = True
            view = socket.socket(fileno=self._fd)
            with contextlib.suppress(OSError):
                view.shutdown(socket.SHUT_RDWR)
            view.detach()


class _Connected(http.client.HTTPConnection):
    """An HTTP connection over a socket already opened to the checked address."""

    def __init__(self, host: str, port: int, sock: socket.socket) -> None:
        super().__init__(host, port)
        self.sock = sock

    def connect(self) -> None:
        raise ConnectionError("the connection was closed; a callback never reconnects")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    text = str(exc) or type(exc).__name__
    return text[:500]


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
