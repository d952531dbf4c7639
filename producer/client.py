"""The Python client: submit text, read a job's record, wait for its result."""

from __future__ import annotations

import contextlib
import re
import time
import urllib.parse
from collections.abc import Iterator, Sequence

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from jobqueue import cancel
from jobqueue.callback_hosts import AllowedHosts
from jobqueue.errors import (
    BrokerUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    JobNotFound,
    UnreadableRecord,
    WaitTimeout,
)
from jobqueue.protocol import (
    IDEMPOTENCY_KEY_PATTERN,
    describe_validation_error,
    JobMessage,
    JobRecord,
    JobRequest,
    JobStatus,
    is_job_id,
    new_job_id,
    request_digest,
    validation_problems,
)
from jobqueue.protocol import idempotency_key as idempotency_key_name
from jobqueue.settings import QueueSettings
from jobqueue.metrics_store import JobMetrics
from jobqueue.store import JobStore, connect_redis
from jobqueue.queue import CELERY_WIRE_CONFIG
from jobqueue.queue.brokers import broker_for, celery_broker_config
from jobqueue.queue.submission import Claim


class Client:
    """Submit jobs to the queue and read their records from Redis.

    >>> client = Client("redis://127.0.0.1:6379/0")
    >>> job_id = client.submit("送餐太慢了，菜都凉了")
    >>> record = client.wait(job_id, timeout=60)
    >>> record.sentiment.label, record.reply
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: QueueSettings | None = None,
        redis_client: redis.Redis | None = None,
    ):
        settings = settings or QueueSettings()
        if redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.settings = settings
        self._redis = redis_client or connect_redis(settings.redis_url, retries=2, socket_timeout=5)
        self.store = JobStore(self._redis, settings.result_ttl_s)
        self.broker = broker_for(settings, self.store)
        self._celery = Celery("qwen-allinone-producer", set_as_current=False)
        self._celery.conf.update(
            CELERY_WIRE_CONFIG,
            # The broker's own settings; on Redis, a job is published with its record in one step.
            **celery_broker_config(settings, heartbeat_s=0),
            # Fail fast with BrokerUnavailable rather than hang when the broker is down.
            task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )

    def close(self) -> None:
        self._celery.close()
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submit ---

    def submit(
        self,
        text: str,
        *,
        conversation_id: str | None = None,
        tenant: str | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        temperature: float | None = None,
        labels: str = "zh",
        priority: str = "interactive",
        callback_url: str | None = None,
        history: Sequence[tuple[str, str]] | None = None,
        idempotency_key: str | None = None, callback_on_cancel: bool = False, callback_hosts: AllowedHosts | None = None,
    ) -> str:
        """Validate and enqueue one job; return its id.

        With an ``idempotency_key``, a retry within RESULT_TTL_S returns the first submit's job id and
        queues nothing, even when retries race from many threads (the key is claimed in the same
        atomic step that queues the job); the key is scoped by ``tenant``. The same key with another
        request raises InvalidRequest naming ``idempotency_key``.

        A ``conversation_id`` is scoped by ``tenant``: the same id under two
        tenants is two conversations, and one without a tenant is a third. A
        service with several users passes each user's tenant. ``priority="bulk"`` queues
        the job behind interactive ones, for at most BULK_MAX_WAIT_S (JobRequest.priority).
        A ``callback_url`` allowed by ``callback_hosts`` (default CALLBACK_ALLOWED_HOSTS) gets the final record
        POSTed by a gateway (producer.api.callbacks); a cancelled job's only with ``callback_on_cancel``.
        ``history`` is the earlier (user, assistant) turns of a conversation the caller keeps
        itself, oldest first: the reply's history instead of a stored conversation's (so never
        with ``conversation_id``), and not stored (JobRequest.history).
        The record, the message and the conversation's pending turn are written
        in one atomic step (``jobqueue.queue.submission``): all or nothing. With the queue
        in RabbitMQ, the record first and then the message (``jobqueue.queue.amqp``).
        Raises InvalidRequest (bad input) or QueueFull (MAX_QUEUE jobs waiting; TenantQueueFull: TENANT_MAX_QUEUE of the tenant's)
        with nothing written, and BrokerUnavailable when Redis or the broker cannot be reached.
        """
        # Over 50 lines: the keyword arguments and their documentation; the body is three steps (validate,
        # build the message, queue).
        request = self._validate(
            {
                "text": text,
                "conversation_id": conversation_id,
                "tenant": tenant,
                "priority": priority,
                "callback_url": callback_url, "callback_on_cancel": callback_on_cancel,
                "history": None if history is None else [{"user": user, "assistant": assistant}
                                                         for user, assistant in history],
                "options": {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                            "temperature": temperature, "labels": labels},
            }, callback_hosts)
        message = self._message(request)
        return self._queue(JobRecord.queued(new_job_id(), message), message, _claim(idempotency_key, request))

    def _message(self, request: JobRequest) -> JobMessage:
        """A new job's message: its request, and the deadlines QUEUE_TIMEOUT_S and JOB_TIMEOUT_S give it."""
        now = time.time()
        return JobMessage(request=request, submitted_at=now, start_by=now + self.settings.queue_timeout_s,
                          timeout_s=self.settings.job_timeout_s)

    def _queue(self, record: JobRecord, message: JobMessage, claim: Claim | None) -> str:
        """Hand the job to the broker; the id of the job queued (a claimed one's, with a claim)."""
        bulk = record.request is not None and record.request.priority == "bulk"
        try:
            with self._broker_errors():
                return self.broker.submit(self._celery, record, message, ttl_s=self.settings.result_ttl_s,
                                          lane_limit=self.settings.max_queue_bulk if bulk else 0, claim=claim,
                                          tenant_limit=self.settings.tenant_max_queue)
        except IdempotencyConflict as err:
            problem = (f"{claim.name!r} was used for another request (job {err.job_id}) in the last "
                       "RESULT_TTL_S; send that request again, or use a new key")
            raise InvalidRequest(f"idempotency_key: {problem}", [("idempotency_key", problem)]) from None
        except BrokerUnavailable:
            # The connection may have dropped after the script ran: then the job is queued
            # and its record says so. Nothing is ever deleted here (it might run).
            with contextlib.suppress(redis.RedisError):
                if self.store.get(record.job_id) is not None:
                    return record.job_id
            raise

    def _validate(self, data: dict, callback_hosts: AllowedHosts | None = None) -> JobRequest:
        data["options"] = {k: v for k, v in data["options"].items() if v is not None}
        try:
            request = JobRequest.model_validate(
                data, context={"max_input_chars": self.settings.max_input_chars}
            )
        except ValidationError as err:
            raise InvalidRequest(describe_validation_error(err), validation_problems(err)) from None
        if request.callback_url is not None:
            hosts = callback_hosts if callback_hosts is not None else self.settings.allowed_callback_hosts
            problem = hosts.refusal(request.callback_url)
            if problem is not None:
                raise InvalidRequest(f"callback_url: {problem}", [("callback_url", problem)])
        return request

    @contextlib.contextmanager
    def _broker_errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, OperationalError, OSError) as err:
            # kombu wraps what Redis answered while publishing; an answer is not an outage.
            answer = err.__cause__ or err.__context__
            if isinstance(answer, redis.ResponseError) and not isinstance(answer, redis.ConnectionError):
                self._raise_for_answer(answer)
            where = self._safe_url(redis_side=not isinstance(err, OperationalError))
            raise BrokerUnavailable(f"broker unreachable at {where}: {err}") from err
        except redis.ResponseError as err:
            self._raise_for_answer(err)

    def _raise_for_answer(self, err: redis.ResponseError) -> None:
        refusal = _refusal(err)
        if refusal is None:
            raise err
        # Full (maxmemory with noeviction), a replica, or a failed snapshot: nothing was
        # written, and retrying later can succeed, as with an outage.
        raise BrokerUnavailable(f"broker at {self._safe_url()} refuses writes: {refusal}") from err

    def _safe_url(self, redis_side: bool = True) -> str:
        # Never print a password that may be part of REDIS_URL or BROKER_URL.
        if not redis_side and self.broker.kind == "amqp":
            url = urllib.parse.urlsplit(self.settings.broker)
            return f"{url.hostname or '?'}:{url.port or 5672}"
        pool_kwargs = self._redis.connection_pool.connection_kwargs
        return f"{pool_kwargs.get('host', '?')}:{pool_kwargs.get('port', '?')}"

    # --- cancel ---

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job and return its record as it is after the request.

        A queued job ends ``cancelled`` at once, leaves the queue, and never runs. A running job
        stops at its worker's next decoding step (a quarter second or so) and ends
        ``cancelled`` with its partial reply; the record returned still says
        ``running`` (``wait`` for the end). Raises JobNotFound for an unknown id,
        and AlreadyFinal (with the record) for a job that had already ended.
        """
        with self._broker_errors():  # the rules: jobqueue.cancel
            return cancel.cancel(self.store, job_id, self.broker.cancel_lanes())

    # --- read ---

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None if the id is unknown or its record expired; a queued one
        with its place in line and ETA (as ``place_in_line`` gives them), in one round trip."""
        if not is_job_id(job_id):
            return None
        with self._broker_errors():
            record, place, rate = self.store.get_with_place(job_id, self.broker.line_index, time.time())
        if record is not None and record.status is JobStatus.QUEUED:
            _set_place(record, place, rate)
        return record

    def _read(self, job_id: str) -> JobRecord | None:
        """The record as stored: what ``wait`` and ``watch`` poll, without its place in line."""
        if not is_job_id(job_id):
            return None
        with self._broker_errors():
            return self.store.get(job_id)

    def place_in_line(self, records: list[JobRecord]) -> None:
        """Fill in each queued record's ``queue_position`` (1 = next) and ``eta_s``, in place.

        One ZRANK each in the place-in-line index (``jobqueue.queue.line``: O(log N), however long
        the queue; none on RabbitMQ), and the service rate of the last SERVICE_RATE_WINDOW_S for the
        ETA: position / rate."""
        queued = [record for record in records if record.status is JobStatus.QUEUED]
        if not queued:
            return
        with self._broker_errors():
            positions = self.broker.positions(self._celery, [r.job_id for r in queued])
            rate = self.store.service_rate(time.time()) if positions else None
        for record in queued:
            _set_place(record, positions.get(record.job_id), rate)

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None | UnreadableRecord]:
        """Several records in one round trip (None: unknown or expired; an unreadable one as its error)."""
        with self._broker_errors():
            return self.store.get_many(job_ids)

    def queue_depth(self) -> int:
        with self._broker_errors():
            return self.broker.depth(self._celery)

    def tenant_queue_depths(self) -> dict[str, int]:
        """Jobs waiting per tenant with any waiting ("" for jobs without a tenant); {} on RabbitMQ."""
        with self._broker_errors():
            return self.broker.tenant_depths()

    def read_metrics(self) -> JobMetrics:
        """Jobs by final status and stage latency histograms, as workers counted them."""
        with self._broker_errors():
            return self.store.read_metrics()

    def ping_workers(self, timeout: float = 1.0) -> list[str]:
        """Names of the workers that answer a Celery ``ping`` within ``timeout`` seconds.

        Uses Celery's remote control (on by default in workers). Raises
        BrokerUnavailable when Redis cannot be reached.
        """
        with self._broker_errors():
            replies = self._celery.control.ping(timeout=timeout)
        return sorted(name for reply in replies for name in reply)

    def watch(self, job_id: str, timeout: float, poll_interval: float = 0.2) -> Iterator[JobRecord]:
        """Yield the record each time it changes, until it is final.

        Raises JobNotFound if the record is missing, WaitTimeout after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last: JobRecord | None = None
        while True:
            record = self._read(job_id)
            if record is None:
                raise JobNotFound(job_id)
            if record != last:
                yield record
                last = record
            if record.status.is_final:
                return
            if time.monotonic() >= deadline:
                raise WaitTimeout(job_id, timeout, record.status.value)
            time.sleep(poll_interval)

    def wait(self, job_id: str, timeout: float = 120.0, poll_interval: float = 1.0) -> JobRecord:
        """Block until the job is final and return its record.

        The worker's final write wakes the wait at once (a Redis BLPOP on the
        job's done signal, no polling); the record is re-read at least every
        ``poll_interval`` seconds all the same. Raises JobNotFound for an
        unknown or expired id, WaitTimeout after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            record = self._read(job_id)
            if record is None:
                raise JobNotFound(job_id)
            if record.status.is_final:
                return record
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(job_id, timeout, record.status.value)
            # Within the socket timeout (5 s): a blocked read must not look like a dead connection.
            with self._broker_errors():
                self.store.wait_until_final(job_id, max(0.01, min(left, poll_interval, 4.0)))


def _claim(idempotency_key: str | None, request: JobRequest) -> Claim | None:
    """The claim a submit under ``idempotency_key`` makes, scoped by the request's tenant."""
    if idempotency_key is None:
        return None
    if not isinstance(idempotency_key, str) or not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, idempotency_key):
        problem = "must be 1 to 255 printable ASCII characters, not starting or ending with a space"
        raise InvalidRequest(f"idempotency_key: {problem}", [("idempotency_key", problem)])
    return Claim(idempotency_key_name(request.tenant, idempotency_key), request_digest(request), idempotency_key)


#: Redis's answers when it refuses writes for a while, and what they mean.
_REFUSALS = {
    "OOM": "OOM (maxmemory is reached and the policy is noeviction)",
    "READONLY": "READONLY (it is a read-only replica)",
    "MISCONF": "MISCONF (it cannot persist a snapshot and stops writes)",
}


def _refusal(err: redis.ResponseError) -> str | None:
    """What the refusal means, or None for another error. A pipeline's error text quotes the
    command (the user's text), so the answer names the kind of refusal only."""
    if isinstance(err, redis.exceptions.OutOfMemoryError):
        return _REFUSALS["OOM"]
    if isinstance(err, redis.exceptions.ReadOnlyError):
        return _REFUSALS["READONLY"]
    text = str(err)
    return next((meaning for code, meaning in _REFUSALS.items() if text.startswith(code) or f" {code} " in text),
                None)


def _set_place(record: JobRecord, place: int | None, rate: float | None) -> None:
    """A queued record's place in line and ETA (place / jobs finished per second), as read."""
    record.queue_position = place
    record.eta_s = round(place / rate, 1) if rate and place else None
