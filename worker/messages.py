"""What a worker takes from its broker: JSON messages for our one task, and nothing else.

Anyone who can write to the broker can put anything in a queue. Left to themselves, kombu and
Celery die on bytes that are not JSON or JSON that is not a message (kombu parses them inside
the worker's event loop), log errors with tracebacks for bodies they refuse, run any of
Celery's built-in tasks, and hold a message with a far-future ETA unacknowledged in memory.
Here every such message is dropped with one warning and the worker goes on serving:

- the guarded transports (Redis, and the embedded broker's folder of message files) drop what
  cannot be read as a kombu message before kombu builds one (so it is never held unacked);
- the Consumer drops every task message but a protocol-2 JSON message for TASK_NAME whose
  arguments are one job id, with no callbacks, due within MAX_ETA_S.

`guard(app)` installs both; call it before the app's first broker connection.
"""

from __future__ import annotations

import base64
import binascii
import logging
import reprlib
import time
import uuid
from datetime import UTC, datetime
from queue import Empty
from typing import Any

from celery import Celery
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ChannelError, ContentDisallowed, DecodeError
from kombu.message import Message
from kombu.serialization import prepare_accept_content
from kombu.transport import TRANSPORT_ALIASES, filesystem, redis
from kombu.utils.json import dumps
from redis.exceptions import ConnectionError as RedisConnectionError

from producer.broker import MAX_RETRY_DELAY_S, TASK_NAME

log = logging.getLogger(__name__)

DROPPED = "dropped a broker message"
# Ours are under 2 KB; anything this big is not one of ours.
MAX_MESSAGE_BYTES = 64 * 1024
# Our only delayed messages are transient retries, due at most MAX_RETRY_DELAY_S ahead; the
# margin covers clock skew between the worker that sent one and the worker that takes it.
MAX_ETA_S = MAX_RETRY_DELAY_S + 60.0
ACCEPT = prepare_accept_content(["json"])
_EMBEDDED_WORK = ("callbacks", "errbacks", "chain", "chord")
_short = reprlib.Repr()
_short.maxlevel, _short.maxdict, _short.maxlist, _short.maxstring = 3, 8, 4, 80
_describe = _short.repr


class Malformed(Exception):
    """Why a message is not one of ours."""


def drop(reason: str, what: object = None) -> None:
    """Log one warning for a dropped message: why, and a short description of it."""
    described = "" if what is None else f": {_describe(what)}"
    log.warning("%s: %s%s", DROPPED, reason, described)


# --- transports: the raw message ----------------------------------------------------------


def check_envelope(raw: object) -> None:
    """Raise Malformed unless `raw` is a kombu message kombu can build without failing."""
    if not isinstance(raw, dict):
        raise Malformed(f"not a message envelope but a JSON {type(raw).__name__}")
    properties = raw.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        raise Malformed("no properties with a delivery tag")
    if not isinstance(properties.get("delivery_info", {}), dict):
        raise Malformed("delivery info is not an object")
    if not isinstance(raw.get("headers", {}), dict):
        raise Malformed("headers are not an object")
    for key in ("content-type", "content-encoding"):
        if not isinstance(raw.get(key, ""), str | None):
            raise Malformed(f"{key} is not a string")
    size = len(dumps(raw))
    if size > MAX_MESSAGE_BYTES:
        raise Malformed(f"{size} bytes, over the limit of {MAX_MESSAGE_BYTES}")
    body = raw.get("body")
    if not isinstance(body, str | None):
        raise Malformed("body is not a string")
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        raise Malformed(f"body encoding {_describe(encoding)} is not base64")
    if encoding and body:
        try:
            base64.b64decode(body, validate=True)
        except binascii.Error as exc:
            raise Malformed(f"body is not base64 ({exc})") from None


class _Delivered:
    """Marks what a message's consumer raised, so reading errors can be told apart from it."""

    attribute = "_backdrop_delivered"

    @classmethod
    def mark(cls, exc: BaseException) -> None:
        setattr(exc, cls.attribute, True)

    @classmethod
    def marked(cls, exc: BaseException) -> bool:
        return getattr(exc, cls.attribute, False)


class _GuardedTransport:
    """Checks each raw message before kombu builds a Message from it (mixin for a virtual
    transport): a malformed one is dropped before it is ever held unacknowledged."""

    def _deliver(self, message: Any, queue: str | None) -> None:
        try:
            check_envelope(message)
        except Malformed as exc:
            drop(str(exc), message)
            return
        try:
            super()._deliver(message, queue)  # type: ignore[misc]
        except BaseException as exc:
            _Delivered.mark(exc)
            raise


def _unreadable(exc: Exception) -> str:
    return f"not a JSON message ({type(exc).__name__}: {_describe(str(exc))})"


class RedisChannel(redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        # kombu parses the popped item and hands it on in one method: whatever the parsing
        # raises (not JSON, nested past the recursion limit, a kombu type marker that does
        # not decode) would stop the worker. The item is already off the list: drop it.
        try:
            read: bool = super()._brpop_read(**options)  # type: ignore[misc]  # not in the stubs
        except Exception as exc:
            if _Delivered.marked(exc) or isinstance(exc, self._passed_on):
                raise
            drop(_unreadable(exc))
            raise Empty() from None
        return read

    # Like kombu's own, without the virtual channel's `timeout` (celery-types copies that).
    def _get(self, queue: str) -> Any:  # type: ignore[override]
        try:
            return super()._get(queue)
        except Exception as exc:
            if isinstance(exc, self._passed_on):
                raise
            drop(_unreadable(exc))
            raise Empty() from None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # kombu forgets a transport's connection details when Celery closes a connection it
        # lost (Redis restarted); a channel of that connection still retrying then read None
        # and the worker died with an AttributeError Celery calls unrecoverable. A connection
        # error sends it down Celery's reconnect path instead (kombu issue 582).
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError("the broker connection was closed while reconnecting")
        params: dict[str, Any] = super()._connparams(  # type: ignore[misc]  # not in the stubs
            asynchronous=asynchronous
        )
        return params

    @property
    def _passed_on(self) -> tuple[type[BaseException], ...]:
        transport = self.connection
        return (Empty, *transport.connection_errors, *transport.channel_errors)


class RedisTransport(_GuardedTransport, redis.Transport):
    Channel = RedisChannel


class FilesystemChannel(filesystem.Channel):
    def _get(self, queue: str) -> Any:  # type: ignore[override]  # as for RedisChannel._get
        # The file is already gone from the queue folder when kombu parses it.
        try:
            return super()._get(queue)
        except (Empty, ChannelError):
            raise
        except Exception as exc:
            drop(_unreadable(exc))
            raise Empty() from None


def _shutdown_requested() -> bool:
    # As celery.worker.state.maybe_shutdown reads the flags: 0 (EX_OK) is a request.
    flags = (worker_state.should_stop, worker_state.should_terminate)
    return any(flag is not None and flag is not False for flag in flags)


class FilesystemTransport(_GuardedTransport, filesystem.Transport):
    """A folder has no blocking read, so kombu polls it (each `polling_interval`) until the
    timeout Celery's loop passes (2 s), and Celery sees a shutdown request only between
    drains: an idle worker took 2-3 s to notice SIGTERM. Drained in polling-interval slices,
    a drain ends as soon as a shutdown is requested, as an idle one would."""

    Channel = FilesystemChannel
    polling_interval = 0.25

    # kombu's virtual transport narrows the base's **kwargs to `timeout`, as this does.
    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if _shutdown_requested():
                raise TimeoutError()
            remaining = self.polling_interval if deadline is None else deadline - time.monotonic()
            try:
                return super().drain_events(
                    connection, timeout=max(0.0, min(self.polling_interval, remaining))
                )
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


# --- consumer: the task message -----------------------------------------------------------


def check_task(message: Message) -> None:
    """Raise Malformed unless `message` asks for TASK_NAME on one job id, now or soon."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        raise Malformed("not a task message (protocol 2)")
    if headers["task"] != TASK_NAME:
        raise Malformed(f"task {_describe(headers['task'])} is not ours")
    if not isinstance(headers.get("id"), str):
        raise Malformed("no task id")
    if headers.get("shadow") is not None:
        raise Malformed("a shadow task name")
    _check_time(headers, "expires")
    due = _check_time(headers, "eta")
    if due is not None:
        ahead = (due - datetime.now(UTC)).total_seconds()
        if ahead > MAX_ETA_S:
            raise Malformed(f"due in {ahead:.0f}s; none of ours is due later than {MAX_ETA_S:.0f}s")
    _check_arguments(_payload(message))


def _check_time(headers: dict[str, Any], key: str) -> datetime | None:
    value = headers.get(key)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise Malformed(f"{key} {_describe(value)} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _payload(message: Message) -> Any:
    message.accept = ACCEPT
    try:
        return message.decode()
    except ContentDisallowed as exc:  # says which content type, e.g. pickle
        raise Malformed(str(exc)) from None
    except DecodeError as exc:
        raise Malformed(f"body does not decode ({exc})") from None


def _check_arguments(payload: Any) -> None:
    if not isinstance(payload, list) or len(payload) != 3:
        raise Malformed("body is not [args, kwargs, options]")
    args, kwargs, embedded = payload
    if not isinstance(args, list) or len(args) != 1 or kwargs != {}:
        raise Malformed("arguments are not one job id")
    if not _is_job_id(args[0]):
        raise Malformed(f"job id {_describe(args[0])} is not a UUID")
    if not isinstance(embedded, dict) or any(embedded.get(key) for key in _EMBEDDED_WORK):
        raise Malformed("it carries callbacks, a chain or a chord")


def _is_job_id(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


class Consumer(CeleryConsumer):
    """Celery's consumer, dropping every task message check_task refuses with one warning."""

    # Set by Celery's __init__; celery-types does not declare it.
    connection_errors: tuple[type[BaseException], ...]

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Message) -> Any:
            try:
                check_task(message)
            except Malformed as exc:
                return self._drop(message, str(exc))
            return handle(message)

        return on_task_received

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        # Also the remote-control (pidbox) consumer's: a broadcast that does not decode.
        self._drop(message, f"body does not decode ({exc})")

    def _drop(self, message: Message, reason: str) -> None:
        drop(reason, message.headers)
        message.reject_log_error(log, self.connection_errors)


def guard(app: Celery) -> None:
    """Make `app`'s workers use the guarded transports and consumer.

    The transports are registered under kombu's URL schemes rather than named in the app's
    config, so kombu still reads everything else from the URL (a rediss:// URL's TLS).
    """
    app.conf.worker_consumer = f"{__name__}:Consumer"
    TRANSPORT_ALIASES.update(
        redis=f"{__name__}:RedisTransport",
        rediss=f"{__name__}:RedisTransport",
        filesystem=f"{__name__}:FilesystemTransport",
    )
