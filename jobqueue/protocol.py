"""The job protocol: every name, key and message shape shared by producers and workers.

This is the ONE module that defines what travels over Redis. Producers write
a ``queued`` record and send a Celery message; workers update the record as
the job runs. Everything is JSON; nothing here imports torch.

Every Redis key, and what it holds, is in ``jobqueue.keys``; its names are re-exported here.
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

# Re-exported: the key names are imported from here too.
from jobqueue.keys import (  # noqa: F401
    CACHE_KINDS, CALLBACKS_KEY, CALLBACK_ATTEMPTS_KEY, CALLBACK_LIMITS_KEY, CALLBACK_PENDING_KEY,
    CONSUMERS_KEY, DEFAULT_CALLBACK_MAX_PENDING, DONE_SIGNAL_TTL_S, FINISHED_RECENTLY_KEY, KEY_PREFIX,
    LINE_KEY, LINE_LANE_SPAN, LINE_SEQ_KEY, METRICS_CACHE_KEY, METRICS_JOBS_KEY, METRICS_TENANT_JOBS_KEY,
    OPEN_JOBS_KEY, QUEUE_NAME, RECONCILER_LOCK_KEY, RESENDS_KEY, SERVICE_RATE_WINDOW_S, STAGES,
    STAGE_BUCKETS_S, SUSPECTS_KEY, UNSENT_JOBS_KEY, WRITE_PROBE_KEY, batch_idempotency_key, batch_key,
    batch_record_key, bucket_field, cache_key, cancel_key, consumer_key, conversation_key, done_key,
    held_key, idempotency_key, job_key, metrics_counted_key, metrics_stage_key, open_job_score,
    pending_turns_key, rate_key, runner_key, stage_seconds,
)
from jobqueue.labels import LABEL_SETS

# --- names -------------------------------------------------------------------

#: Celery task name; producers send by name and never import the worker.
TASK_NAME = "qwen_allinone.run_job"


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

    def time_limit(self, asked_s: float, worker_timeout_s: float) -> None:
        """The job's time limit: what its producer asked for, capped by the worker's JOB_TIMEOUT_S."""
        self.timeout_s = min(asked_s, worker_timeout_s)

    def in_batch_of(self, size: int) -> None:
        self.batch_size = size

    def on_model(self, model_id: str) -> None:
        self.model_id = model_id

    def labelled(self, sentiment: Sentiment, sentiment_ms: float) -> None:
        self.sentiment, self.timings.sentiment_ms = sentiment, sentiment_ms

    def reply_so_far(self, text: str | None) -> None:
        """The reply written so far (None: a failed run's partial reply is no result)."""
        self.reply = text

    def input_flagged(self, spans: list[FlaggedSpan]) -> None:
        """The user's text holds listed terms, where ``spans`` say: it gets no answer of the model's."""
        self.flagged = Flagged(input=list(dict.fromkeys(span.term for span in spans)), input_spans=spans)

    def reply_withheld(self, terms: list[str], safety_message: str) -> None:
        """The reply held listed terms: the operator's message stands in for it."""
        self.flagged = Flagged(input=self.flagged.input if self.flagged else [], reply=terms)
        self.reply = safety_message

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

