"""Errors a producer raises. Each message says what went wrong and what to do."""

from __future__ import annotations


class ProducerError(Exception):
    """Base class of every error raised by the producer."""


class InvalidRequest(ProducerError, ValueError):
    """The request failed validation; nothing was enqueued or written."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        #: (field, message) per problem, e.g. ("options.max_new_tokens", "Input should be ..."),
        #: so that an HTTP gateway can name each field in its own error format.
        self.problems = problems or []
        super().__init__(message)


class QueueFull(ProducerError):
    """The queue already holds MAX_QUEUE jobs (or the job's lane its own limit); nothing was written."""

    def __init__(self, depth: int, limit: int, lane: str | None = None):
        self.depth = depth
        self.limit = limit
        self.lane = lane
        setting = "MAX_QUEUE" if lane is None else f"MAX_QUEUE_{lane.upper()}"
        waiting = "jobs waiting" if lane is None else f"{lane} jobs waiting"
        super().__init__(f"queue full: {depth} {waiting}, {setting}={limit}; retry later or add workers")


class TenantQueueFull(QueueFull):
    """The tenant already has TENANT_MAX_QUEUE jobs waiting; nothing was written."""

    def __init__(self, depth: int, limit: int, tenant: str | None):
        self.depth, self.limit, self.lane, self.tenant = depth, limit, None, tenant
        ProducerError.__init__(self, f"tenant queue full: {depth} jobs of this tenant waiting, TENANT_MAX_QUEUE={limit}; "
                                     "retry later")


class BrokerUnavailable(ProducerError, ConnectionError):
    """Redis could not be reached; nothing was enqueued."""


class UnreadableRecord(ProducerError, ValueError):
    """The value stored under a job key is not a record this version can read."""


class JobNotFound(ProducerError, LookupError):
    """No record for this job id: never submitted, or expired from the store."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"job {job_id} not found (unknown id, or its record expired)")


class WaitTimeout(ProducerError, TimeoutError):
    """The job did not reach a final status within the wait timeout."""

    def __init__(self, job_id: str, timeout: float, status: str):
        self.job_id = job_id
        self.status = status
        super().__init__(
            f"job {job_id} still {status} after waiting {timeout:g}s; "
            "it keeps running: wait again or check it later with `get`"
        )


class AlreadyFinal(ProducerError):
    """The job had already ended, so it cannot be cancelled; ``record`` is its final record."""

    def __init__(self, record):
        self.record = record
        super().__init__(f"job {record.job_id} already ended {record.status.value}; nothing to cancel")


class IdempotencyConflict(ProducerError):
    """An idempotency key is claimed by a job of another request; nothing was written.
    ``Client.submit`` answers it as InvalidRequest naming ``idempotency_key``."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"the idempotency key is taken by job {job_id}, of another request")
