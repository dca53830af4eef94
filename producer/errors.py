"""The error hierarchy: every failure a job can end with has one code from the SPEC.

Permanent errors are the caller's (bad input): retrying cannot help, so a job fails at once.
Transient errors are the infrastructure's: the worker retries them with backoff and reports
the code only once the retries are spent.
"""


class BackdropError(Exception):
    """Base class; `code` is what lands in the job record and on the CLI's stderr."""

    code = "internal"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PermanentError(BackdropError):
    """Bad input or a refused request: fail the job now, never retry."""


class InvalidRequest(PermanentError):
    code = "invalid_request"


class InputNotFound(PermanentError):
    code = "input_not_found"


class BackgroundNotFound(PermanentError):
    code = "background_not_found"


class InvalidImage(PermanentError):
    code = "invalid_image"


class InputTooLarge(PermanentError):
    code = "input_too_large"


class UnsupportedFormat(PermanentError):
    code = "unsupported_format"


class AccessDenied(PermanentError):
    code = "access_denied"


class OutputExists(PermanentError):
    """An output would replace an object this job did not write, and overwrite was not asked."""

    code = "output_exists"


class NoSubject(PermanentError):
    code = "no_subject"


class JobNotFound(PermanentError):
    code = "job_not_found"


class InvalidTransition(PermanentError):
    """A status change the state machine forbids (e.g. canceling a running job)."""

    code = "invalid_transition"


class OutputNotReady(PermanentError):
    """A job's output (or mask) was asked for before the job succeeded, or it saved none."""

    code = "output_not_ready"


class BatchTooLarge(InvalidRequest):
    code = "batch_too_large"


class Unauthorized(BackdropError):
    code = "unauthorized"


class ApiMisconfigured(BackdropError):
    """The API's settings would serve it unsafely (no tokens, a weak one): it refuses to start."""

    code = "api_misconfigured"


class BackfillNotFound(PermanentError):
    code = "backfill_not_found"


class BackfillUnreachable(PermanentError):
    code = "backfill_failed"


class WeightsUnavailable(PermanentError):
    """No model weights could be found or downloaded: an operator must act."""

    code = "weights_unavailable"


class TransientError(BackdropError):
    """The infrastructure failed; the same job may well succeed on a later attempt."""

    retryable = True


class StorageUnavailable(TransientError):
    code = "storage_unavailable"


class DatabaseUnavailable(TransientError):
    code = "database_unavailable"


class WorkerLost(PermanentError):
    """The job's worker died on it too many times (a poison photo)."""

    code = "worker_lost"


class DeviceUnavailable(PermanentError):
    """The requested device (e.g. --device cuda) is not on this host."""

    code = "device_unavailable"


# Outcomes of CLI commands, never a job's: the code on the `code: message` line a command
# prints on stderr as it exits non-zero.


class InvalidSettings(PermanentError):
    """A BACKDROP_* environment variable does not validate."""

    code = "invalid_settings"


class WaitTimedOut(BackdropError):
    """A command stopped waiting for a job that is not final yet (the job goes on)."""

    code = "timeout"


class Interrupted(BackdropError):
    """Ctrl-C stopped a command's waiting; the job or backfill goes on (or is paused)."""

    code = "interrupted"


class PhotosFailed(PermanentError):
    """`backdrop process`: some of several photos failed (each listed with its code)."""

    code = "photos_failed"


class JobsFailed(PermanentError):
    """A backfill ended with failed photos (listed in its report)."""

    code = "jobs_failed"


class BackfillCanceled(PermanentError):
    """The backfill a command ran was canceled."""

    code = "canceled"


class BackfillPaused(PermanentError):
    """The backfill a command ran was paused; --resume continues it."""

    code = "paused"


class DemoFailed(BackdropError):
    """`backdrop demo` could not run its flow end to end."""

    code = "demo_failed"


class BrokerUnavailable(TransientError):
    """The broker refused or dropped a publish: the jobs were not queued."""

    code = "broker_unavailable"
