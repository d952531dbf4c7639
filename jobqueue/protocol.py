"""The job protocol: every name, key and message shape shared by producers and workers.

This is the ONE module that defines what travels over Redis. Producers write
a ``queued`` record and send a Celery message; workers update the record as
the job runs. Everything is JSON; nothing here imports torch.

Redis key scheme (all keys share ``KEY_PREFIX``):

==========================================  ======  ==========================================
key                                         type    holds
==========================================  ======  ==========================================
``qwen-allinone`` (``QUEUE_NAME``)          list    Celery messages waiting for a worker (a queue in RabbitMQ
                                                    instead when BROKER_URL is ``amqp://``)
``qwen-allinone:job:<job_id>``              string  the job record (``JobRecord`` as JSON)
``qwen-allinone:conv:<scope>``              list    earlier turns (``Turn`` as JSON), newest last; the scope is
                                                    ``<tenant>/<conversation_id>``, or the conversation id alone
                                                    for a job without a tenant (``JobRequest.conversation_scope``)
``qwen-allinone:turns:<scope>``             list    ids of the conversation's unfinished jobs, oldest first
``qwen-allinone:batch:<job_id>``            hash    while the batch of this delivered job runs: ``pid``, its pool
                                                    process, and ``taken``, the ids of the jobs taken into it (JSON)
``qwen-allinone:batches:<batch_id>``       hash    a batch of jobs (``POST /v1/batches``, ``jobqueue.batches``): ``tenant``,
                                                    ``job_ids`` (JSON, input order), ``created_at``, ``cancelled``;
                                                    RESULT_TTL_S (not the worker's ``batch:<job_id>`` above)
``qwen-allinone:metrics:jobs``              hash    finished jobs by final status (status → count)
``qwen-allinone:metrics:tenant-jobs``       hash    finished jobs of a tenant by final status (``<status>:<tenant>`` → count)
``qwen-allinone:metrics:stage:<stage>``     hash    latency histogram of one stage (``STAGES``): ``le:<bound>``
                                                    → jobs in that bucket (not cumulative), ``count``, ``sum`` (s)
``qwen-allinone:metrics:finished``          zset    job ids finished in the last SERVICE_RATE_WINDOW_S, by finish time
``qwen-allinone:callbacks``                 zset    final jobs whose callback_url is still to be POSTed, by next try
``qwen-allinone:callbacks:attempts``        hash    job id → callback attempts so far; ``<job id>:first`` → when the first was;
                                                    ``<job id>:owner`` → ``<host:port>\n<tenant>`` its pending count is held under
``qwen-allinone:callbacks:pending``         hash    ``host:<host:port>`` / ``tenant:<tenant>`` → callbacks pending for it
``qwen-allinone:callbacks:limits``          hash    ``host`` / ``tenant`` → the gateway's caps on those counts
``qwen-allinone:metrics:cache``             hash    result-cache lookups: ``<kind>_hits`` / ``<kind>_misses``
``qwen-allinone:cache:<kind>:<sha256>``     string  a cached sentiment or greedy reply (JSON), CACHE_TTL_S
``qwen-allinone:metrics:counted:<job_id>``  string  marks a job already counted, so a second final write is not
``qwen-allinone:open``                      zset    every job whose record is queued or running, scored by its
                                                    deadline (start_by while queued, started_at + timeout_s
                                                    while running); the reconciler's list of what must finish
``qwen-allinone:consumer:<consumer_id>``    string  a process holding queue messages is alive (short TTL)
``qwen-allinone:held:<consumer_id>``        set     delivery tags of the messages that process holds unacked
``qwen-allinone:consumers``                 set     consumer ids that have held messages (pruned when dead)
``qwen-allinone:cancel:<job_id>``           string  a running job's client asked to stop it (removed with the final record)
``qwen-allinone:runner:<job_id>``           string  the consumer id of the process running the job's attempt
                                                    (lapses after the hard time limit; released when it ends)
``qwen-allinone:reconciler``                string  the reconciler's lock: one sweep at a time across workers
``qwen-allinone:suspects``                  hash    what the last sweep found unheld (``job:<id>`` or
                                                    ``tag:<tag>``) → when it was first seen so
``qwen-allinone:resends``                   hash    job id → times the reconciler re-sent it
``qwen-allinone:unsent``                    zset    with the queue in RabbitMQ: open jobs whose publish is not
                                                    confirmed yet, or whose message a worker dropped unfinished,
                                                    by when they were marked (the reconciler re-sends them)
``qwen-allinone:probe``                     string  written by a worker to learn whether Redis takes writes again
``qwen-allinone:line``                      zset    every job message waiting in a Redis lane, scored by its place in
                                                    line (lane × LINE_LANE_SPAN + that lane's sequence number):
                                                    ZRANK + 1 is the job's ``queue_position``, in O(log N)
``qwen-allinone:line:seq``                  hash    per lane, the sequence numbers last given out: ``back:<lane>``
                                                    counts up (queued at the end), ``front:<lane>`` down (handed
                                                    back to the front)
``qwen-allinone:line:t:<tenant>``           zset    a tenant's own waiting jobs, scored as in ``line`` ("" for jobs
                                                    without a tenant): ZCARD is its queue depth (TENANT_MAX_QUEUE)
``qwen-allinone:line:tenant``               hash    waiting job id → its tenant (so a job leaves its tenant's line)
``qwen-allinone:line:tenants``              zset    the tenants with jobs waiting, by name (score 0)
``qwen-allinone:line:turn``                 string  the tenant the fair intake took a job from last (round robin)
``qwen-allinone:rate:<tenant>``             hash    the gateway's submit token bucket of a tenant: ``tokens``, ``at``
``qwen-allinone:idem:<sha256>``             string  an idempotency key's claim: ``<job id> <sha256 of the request>``,
                                                    RESULT_TTL_S; the digest is of the tenant and the key together
``qwen-allinone:batch-idem:<sha256>``       hash    a batch's idempotency claim (``jobqueue.batches.BatchClaims``): ``batch``,
                                                    ``digest`` (of its jobs' requests), ``owner`` and ``until`` (the
                                                    lease of the gateway queueing it), ``done``; RESULT_TTL_S
==========================================  ======  ==========================================

Job records, conversations and the ``counted`` marks expire ``RESULT_TTL_S``
after their last write. The metrics hashes never expire: they are counters
that only grow, as Prometheus expects.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from jobqueue.labels import LABEL_SETS

# --- names -------------------------------------------------------------------

KEY_PREFIX = "qwen-allinone"
#: Celery queue; with the Redis transport it is also the key of the list of waiting messages.
QUEUE_NAME = "qwen-allinone"
#: Celery task name; producers send by name and never import the worker.
TASK_NAME = "qwen_allinone.run_job"


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}"


def conversation_key(conversation_id: str) -> str:
    return f"{KEY_PREFIX}:conv:{conversation_id}"


def pending_turns_key(conversation_id: str) -> str:
    return f"{KEY_PREFIX}:turns:{conversation_id}"


def done_key(job_id: str) -> str:
    """A list that gets one item in the same transaction as the job's final record.

    ``Client.wait`` blocks on it (BLPOP) instead of polling the record.
    """
    return f"{KEY_PREFIX}:done:{job_id}"


#: How long a job's done signal outlives its final record's write.
DONE_SIGNAL_TTL_S = 60


def batch_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:batch:{job_id}"


def batch_record_key(batch_id: str) -> str:
    """A submitted batch of jobs (``jobqueue.batches``); unrelated to the worker's ``batch_key``."""
    return f"{KEY_PREFIX}:batches:{batch_id}"


#: Finished jobs by final status.
METRICS_JOBS_KEY = f"{KEY_PREFIX}:metrics:jobs"
#: Finished jobs of each tenant by final status: ``<status>:<tenant>`` → count (jobs with a tenant only).
METRICS_TENANT_JOBS_KEY = f"{KEY_PREFIX}:metrics:tenant-jobs"


def rate_key(tenant: str | None) -> str:
    """A tenant's submit token bucket (the gateway's TENANT_SUBMIT_RATE)."""
    return f"{KEY_PREFIX}:rate:{tenant or ''}"


def metrics_stage_key(stage: str) -> str:
    return f"{KEY_PREFIX}:metrics:stage:{stage}"


#: Jobs finished recently, scored by when (epoch s): the service rate behind a queued job's ETA.
FINISHED_RECENTLY_KEY = f"{KEY_PREFIX}:metrics:finished"
#: The service rate is measured over this many seconds of finished jobs.
SERVICE_RATE_WINDOW_S = 300.0
#: Final jobs whose callback is due, scored by when to try next (epoch s).
CALLBACKS_KEY = f"{KEY_PREFIX}:callbacks"
#: Callback attempts so far, by job id, and when the first was (``<job id>:first``).
CALLBACK_ATTEMPTS_KEY = f"{KEY_PREFIX}:callbacks:attempts"
#: Callbacks pending per host and port (``host:<host:port>``) and per tenant (``tenant:<tenant>``; ``tenant:`` for none).
CALLBACK_PENDING_KEY = f"{KEY_PREFIX}:callbacks:pending"
#: The caps on those counts (``host``, ``tenant``), written by each gateway as it starts
#: (CALLBACK_MAX_PENDING_PER_HOST / _PER_TENANT); until then DEFAULT_CALLBACK_MAX_PENDING.
CALLBACK_LIMITS_KEY = f"{KEY_PREFIX}:callbacks:limits"
DEFAULT_CALLBACK_MAX_PENDING = 1000
#: Result-cache lookups by kind and outcome (``sentiment_hits``, ``reply_misses``, ...).
METRICS_CACHE_KEY = f"{KEY_PREFIX}:metrics:cache"
CACHE_KINDS = ("sentiment", "reply")


def cache_key(kind: str, digest: str) -> str:
    """A cached result: ``kind`` is ``sentiment`` or ``reply``, ``digest`` the SHA-256 of its inputs."""
    return f"{KEY_PREFIX}:cache:{kind}:{digest}"


def metrics_counted_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:metrics:counted:{job_id}"


#: Every open (queued or running) job, scored by its deadline.
OPEN_JOBS_KEY = f"{KEY_PREFIX}:open"
#: Ids of the processes that have held queue messages.
CONSUMERS_KEY = f"{KEY_PREFIX}:consumers"
RECONCILER_LOCK_KEY = f"{KEY_PREFIX}:reconciler"
SUSPECTS_KEY = f"{KEY_PREFIX}:suspects"
RESENDS_KEY = f"{KEY_PREFIX}:resends"
#: With the queue in RabbitMQ: open jobs whose message may not be in the queue, by when marked.
UNSENT_JOBS_KEY = f"{KEY_PREFIX}:unsent"
WRITE_PROBE_KEY = f"{KEY_PREFIX}:probe"
#: Every job message waiting in a Redis lane, by its place in line (``jobqueue.queue.line``).
LINE_KEY = f"{KEY_PREFIX}:line"
#: Per lane, the last sequence numbers given out at its back (``back:<lane>``) and front (``front:<lane>``).
LINE_SEQ_KEY = f"{KEY_PREFIX}:line:seq"
#: A lane's band of scores in LINE_KEY: lane i's jobs score within i × LINE_LANE_SPAN ± LINE_LANE_SPAN / 2.
LINE_LANE_SPAN = 10**12


def idempotency_key(tenant: str | None, key: str) -> str:
    """Where an idempotency key's claim lives: per tenant, so two tenants' keys never meet."""
    digest = hashlib.sha256(json.dumps([tenant, key]).encode()).hexdigest()
    return f"{KEY_PREFIX}:idem:{digest}"


def batch_idempotency_key(tenant: str | None, key: str) -> str:
    """Where a batch's idempotency claim lives (``jobqueue.batches.BatchClaims``): per tenant, apart from jobs' keys."""
    digest = hashlib.sha256(json.dumps([tenant, key]).encode()).hexdigest()
    return f"{KEY_PREFIX}:batch-idem:{digest}"


def consumer_key(consumer_id: str) -> str:
    return f"{KEY_PREFIX}:consumer:{consumer_id}"


def cancel_key(job_id: str) -> str:
    """Set while a running job's client asks for it to stop; the worker polls it between steps."""
    return f"{KEY_PREFIX}:cancel:{job_id}"


def held_key(consumer_id: str) -> str:
    return f"{KEY_PREFIX}:held:{consumer_id}"


def runner_key(job_id: str) -> str:
    """The consumer id of the process running the job's current attempt."""
    return f"{KEY_PREFIX}:runner:{job_id}"


def open_job_score(record: JobRecord) -> float:
    """When an open job is overdue: its start deadline while queued, its run deadline while running."""
    if record.started_at is not None and record.timeout_s is not None:
        return record.started_at + record.timeout_s
    return record.start_by if record.start_by is not None else record.submitted_at


def new_job_id() -> str:
    # UUID4: random, so one client cannot guess another client's job id.
    return str(uuid.uuid4())


def is_job_id(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


# --- limits that are part of the protocol (not deployment settings) -----------

MAX_NEW_TOKENS_LIMIT = 1024
MAX_TIMEOUT_S = 600.0
MAX_TEMPERATURE = 2.0
#: Timestamps in a job message lie between 1970 and this (year 5138): a duration
#: computed from one, in milliseconds, is always a finite float.
MAX_EPOCH_S = 1e11
#: A job's own history (``JobRequest.history``, the clients that keep their conversation, like
#: ``POST /v1/chat/completions``): at most this many earlier turns, of this many characters in all.
MAX_HISTORY_TURNS = 32
MAX_HISTORY_CHARS = 16000
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
#: A tenant name (the gateway's API_KEYS): no "/", which separates it from the conversation id.
TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# --- enums -------------------------------------------------------------------


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    #: Stopped by its client (``Client.cancel``, ``DELETE /v1/jobs/{id}``): never run, or
    #: stopped at the next decoding step with its partial reply kept.
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class ErrorCode(str, enum.Enum):
    INVALID_REQUEST = "invalid_request"  # the message did not match the protocol
    MODEL_ERROR = "model_error"  # the model raised while running the job
    INTERNAL_ERROR = "internal_error"  # anything else inside the worker
    TIMED_OUT = "timed_out"  # killed by the hard time limit
    EXPIRED = "expired"  # waited in the queue past its start deadline
    CANCELLED = "cancelled"  # its client cancelled it


LabelSetName = Literal["zh", "en", "zh3", "en3"]  # LABEL_SETS' names (jobqueue/labels.py)
Priority = Literal["interactive", "bulk"]
#: The broker's message priority of each lane (kombu's Redis transport: 0 is served first).
LANE_PRIORITY: dict[str, int] = {"interactive": 0, "bulk": 9}


# --- request -------------------------------------------------------------------


class _Model(BaseModel):
    # NaN and infinity are valid in kombu's JSON but would poison a record.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class JobOptions(_Model):
    """Per-job options; ``None`` means "the worker's default"."""

    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_LIMIT)] | None = None
    #: Generate at least this many tokens (EOS is ignored until then); for benchmarks of fixed length.
    min_new_tokens: Annotated[int, Field(ge=0, le=MAX_NEW_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)] | None = None
    labels: LabelSetName = "zh"


def _clean_text(text: str) -> str:
    """Control characters (NUL, ESC, ...) removed, tabs and newlines kept; lone surrogates replaced."""
    # They carry no meaning for the model and break terminals and logs; a lone surrogate
    # cannot be encoded as UTF-8 and would fail later, in Redis.
    return _CONTROL_CHARS.sub("", text).encode("utf-8", "replace").decode("utf-8")


class HistoryTurn(_Model):
    """One earlier exchange that the client sent with its job (``JobRequest.history``)."""

    user: str
    assistant: str

    @field_validator("user", "assistant")
    @classmethod
    def _clean(cls, text: str) -> str:
        return _clean_text(text)


class JobRequest(_Model):
    """What a user asks for."""

    # The text's longest length comes in through the validation context ({"max_input_chars": n}): it
    # is a deployment setting. Not in the docstring, which /openapi.json shows to anyone.

    text: str
    conversation_id: Annotated[str, Field(pattern=CONVERSATION_ID_PATTERN)] | None = None
    #: Whose conversation: the same conversation_id under two tenants is two conversations.
    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)] | None = None
    options: JobOptions = Field(default_factory=JobOptions)
    #: ``interactive`` jobs are served first; ``bulk`` jobs (evaluation, labelling runs) wait
    #: behind them, but never longer than BULK_MAX_WAIT_S (then they join the interactive lane).
    priority: Priority = "interactive"
    #: When the job is final, the gateway POSTs its record here, signed (see producer.api.callbacks).
    #: http(s) only; its host must be in CALLBACK_ALLOWED_HOSTS (checked by the Client).
    callback_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://[^\s]+$")] | None = None
    #: Also POST the record when its own client cancels the job; by default a cancelled job has no callback.
    callback_on_cancel: bool = False
    #: Earlier turns the client keeps itself, oldest first: the reply's history instead of a stored
    #: conversation (never with ``conversation_id``), and never stored. At most MAX_HISTORY_TURNS
    #: turns of MAX_HISTORY_CHARS characters in all; the worker keeps what fits HISTORY_MAX_TURNS
    #: and HISTORY_MAX_TOKENS, as it does with a stored conversation.
    history: list[HistoryTurn] | None = None

    @property
    def conversation_scope(self) -> str | None:
        """The conversation's name in Redis keys: ``<tenant>/<conversation_id>``, or None without one."""
        if self.conversation_id is None:
            return None
        return self.conversation_id if self.tenant is None else f"{self.tenant}/{self.conversation_id}"

    @field_validator("text")
    @classmethod
    def _check_text(cls, text: str, info: ValidationInfo) -> str:
        text = _clean_text(text)
        if not text.strip():
            raise ValueError("must contain non-whitespace text")
        limit = (info.context or {}).get("max_input_chars")
        if limit is not None and len(text) > limit:
            raise ValueError(f"must be at most {limit} characters (got {len(text)})")
        return text

    @field_validator("history")
    @classmethod
    def _check_history(cls, history: list[HistoryTurn] | None, info: ValidationInfo) -> list[HistoryTurn] | None:
        if history is None:
            return None
        if info.data.get("conversation_id") is not None:
            raise ValueError("cannot be sent with conversation_id (a stored conversation is the history then)")
        if len(history) > MAX_HISTORY_TURNS:
            raise ValueError(f"must hold at most {MAX_HISTORY_TURNS} turns (got {len(history)})")
        chars = sum(len(turn.user) + len(turn.assistant) for turn in history)
        if chars > MAX_HISTORY_CHARS:
            raise ValueError(f"must hold at most {MAX_HISTORY_CHARS} characters in all (got {chars})")
        return history


#: An idempotency key (``Idempotency-Key``): 1 to 255 printable ASCII characters, not starting or
#: ending with a space.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?$"


def request_digest(request: JobRequest) -> str:
    """The SHA-256 of a request as validated: two submits under one idempotency key must agree on it."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class JobMessage(_Model):
    """The body of the Celery message (its kwargs). The job id is the Celery task id."""

    request: JobRequest
    #: Epoch seconds, bounded so every duration computed from it stays finite.
    submitted_at: Annotated[float, Field(ge=0, le=MAX_EPOCH_S)]
    #: Epoch seconds by which the job must START, or it is recorded ``expired``.
    start_by: Annotated[float, Field(ge=0, le=MAX_EPOCH_S)]
    #: Seconds the job may run once started; generation stops at this deadline.
    timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)]

    @model_validator(mode="after")
    def _start_after_submit(self) -> JobMessage:
        if self.start_by < self.submitted_at:
            raise ValueError("start_by must not be earlier than submitted_at")
        return self


# --- record ----------------------------------------------------------------------


class Sentiment(_Model):
    label: str
    #: The model's probability of ``label`` among the label words, in [0, 1].
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]
    #: What decided: ``prompt:<CLASSIFIER_PROMPT>`` or ``adapter:<name>@<first 8 of its sha256>``.
    classifier: str | None = None
    #: Served from the result cache (CACHE_TTL_S): the same text, label set, classifier and model.
    cached: bool = False


class Timings(_Model):
    """Milliseconds per step; ``None`` for a step that has not run."""

    queue_wait_ms: float | None = None
    sentiment_ms: float | None = None
    history_ms: float | None = None
    reply_ms: float | None = None
    #: From submission to the final status: queue wait plus every step.
    total_ms: float | None = None


# --- latency metrics: workers count every final record, the gateway's /metrics reads them ---

#: Stage name in the metrics → the ``Timings`` field that measures it.
STAGES: dict[str, str] = {
    "queue_wait": "queue_wait_ms",
    "sentiment": "sentiment_ms",
    "reply": "reply_ms",
    "total": "total_ms",
}
#: Upper bounds, in seconds, of the latency histogram buckets: from one sentiment
#: pass (tens of ms) to a job that waited out QUEUE_TIMEOUT_S (600 s by default).
STAGE_BUCKETS_S: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def stage_seconds(timings: Timings) -> dict[str, float]:
    """Seconds spent in each stage that ran (a job that expired in the queue has only ``total``)."""
    measured = {stage: getattr(timings, field) for stage, field in STAGES.items()}
    return {stage: ms / 1000.0 for stage, ms in measured.items() if ms is not None}


def bucket_field(seconds: float) -> str:
    """The histogram hash field of the smallest bucket that holds ``seconds``."""
    for bound in STAGE_BUCKETS_S:
        if seconds <= bound:
            return f"le:{bound:g}"
    return "le:+Inf"


class TokenCounts(_Model):
    sentiment_prompt_tokens: int | None = None
    reply_prompt_tokens: int | None = None
    generated_tokens: int | None = None


class JobError(_Model):
    code: ErrorCode
    message: str


class FlaggedSpan(_Model):
    """Where a listed term stands in the user's text as written: ``text[start:end]`` (characters)."""

    term: str
    start: int
    end: int


class Flagged(_Model):
    """Terms of the operator's safety word list found in the user's text and in the reply."""

    # The list is the worker's SAFETY_WORDS_FILE; not named in the docstring, which /openapi.json shows.

    input: list[str] = Field(default_factory=list)
    #: Each match in the user's text, where it stands as written (spelling tricks included).
    input_spans: list[FlaggedSpan] = Field(default_factory=list)
    reply: list[str] = Field(default_factory=list)


class JobRecord(_Model):
    """The state of one job, as stored in Redis and returned to clients."""

    job_id: str
    status: JobStatus
    #: None only for a message that did not match the protocol (recorded as failed).
    request: JobRequest | None
    submitted_at: float
    start_by: float | None = None
    timeout_s: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    #: How many times a worker has started this job (more than 1 after a redelivery).
    attempts: int = 0
    sentiment: Sentiment | None = None
    #: While ``running``: the reply generated so far (updated every PARTIAL_REPLY_INTERVAL_MS);
    #: once ``succeeded``: the whole reply.
    reply: str | None = None
    #: True when the token limit or the deadline cut the reply short; it then ends at its last
    #: sentence boundary.
    truncated: bool = False
    #: Why the reply ended: ``eos`` (the model finished), ``length`` (max_new_tokens), ``deadline``
    #: or ``cancelled``; None before the reply ends.
    stop_reason: Literal["eos", "length", "deadline", "cancelled"] | None = None
    #: The reply came from the result cache: a greedy reply to the same text with no history.
    reply_cached: bool = False
    #: Set when the safety filter found listed terms; the reply is then SAFETY_MESSAGE.
    flagged: Flagged | None = None
    timings: Timings = Field(default_factory=Timings)
    tokens: TokenCounts = Field(default_factory=TokenCounts)
    model_id: str | None = None
    worker: str | None = None
    #: How many jobs the worker ran together with this one (itself included).
    batch_size: int | None = None
    error: JobError | None = None
    #: While queued, when read: its place in line (1 = next) and the seconds until it starts,
    #: from the service rate of the last SERVICE_RATE_WINDOW_S (None: no job finished lately).
    #: Not stored: worked out from the queue at read time.
    queue_position: int | None = None
    eta_s: float | None = None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def queued(cls, job_id: str, message: JobMessage) -> JobRecord:
        """The record of a job just queued, from its message: the one place a message becomes a record."""
        return cls(job_id=job_id, status=JobStatus.QUEUED, request=message.request, submitted_at=message.submitted_at,
                   start_by=message.start_by, timeout_s=message.timeout_s)

    def start(self, now: float) -> None:
        """Mark this record running for a new attempt (in place): what an earlier attempt wrote is cleared."""
        self.status = JobStatus.RUNNING
        self.started_at = now
        self.sentiment, self.reply, self.truncated, self.error, self.stop_reason = None, None, False, None, None
        self.timings = Timings(queue_wait_ms=round((now - self.submitted_at) * 1000.0, 1))

    def taken_by(self, worker: str) -> None:
        """A worker took the job for a new attempt: one more attempt, and the worker's name."""
        self.attempts += 1
        self.worker = worker

    def reply_ended(self, text: str, *, reply_ms: float, truncated: bool, stop_reason: str, cached: bool,
                    prompt_tokens: int | None, generated_tokens: int | None) -> None:
        """The reply is done (whole, cut short or cancelled): its text, how it ended, what it took."""
        self.timings.reply_ms = reply_ms
        self.reply, self.reply_cached, self.truncated, self.stop_reason = text, cached, truncated, stop_reason
        self.tokens.reply_prompt_tokens, self.tokens.generated_tokens = prompt_tokens, generated_tokens

    def finish(self, status: JobStatus, error: JobError | None = None, now: float | None = None) -> JobRecord:
        """Stamp this record final (in place): status, error, finish time and total time."""
        self.status = status
        self.error = error
        self.finished_at = time.time() if now is None else now
        self.timings.total_ms = round((self.finished_at - self.submitted_at) * 1000.0, 1)
        return self

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobRecord:
        return cls.model_validate_json(raw)


class Turn(_Model):
    """One exchange of a conversation, stored for the next turn's history."""

    #: The job that produced this turn: a redelivered job does not store its turn twice.
    job_id: str
    user: str
    assistant: str


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    """(field, message) per problem: ``("text", "must be at most 2000 characters (got 2001)")``."""
    problems = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "request"
        problems.append((field, problem["msg"].removeprefix("Value error, ")))
    return problems


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the field: ``text: must be at most 2000 characters``."""
    return "; ".join(f"{field}: {message}" for field, message in validation_problems(err))


# --- Celery wire format (shared by both ends) -----------------------------------

#: Only JSON crosses the wire: a pickle payload is refused, never deserialized.
CELERY_WIRE_CONFIG = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_default_queue": QUEUE_NAME,
    "task_routes": {TASK_NAME: {"queue": QUEUE_NAME}},
    # Our own records are the results; Celery's result backend is not used.
    "task_ignore_result": True,
}
