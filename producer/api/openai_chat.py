"""OpenAI's chat-completions request read as a job, and a job's record written as OpenAI's answer.

No I/O here: ``chat_job`` maps a request onto the job it submits, and the
builders turn records into a ``chat.completion`` or ``chat.completion.chunk``
objects. ``producer.api.openai_compat`` serves them.

- The last message is the user's text; the messages before it are the job's
  own history (``JobRequest.history``): each run of user messages and the
  assistant messages after it make one turn. System and developer messages
  are accepted and not used: the worker's own prompt sets the reply's role.
- ``max_completion_tokens`` (or the older ``max_tokens``) is the job's
  ``max_new_tokens``, capped at the protocol's limit; the worker caps it at its
  own ``MAX_NEW_TOKENS``. ``temperature`` is the job's.
- ``sentiment`` (``{"label", "confidence"}``) is an extension field of the
  answer and of the first streamed chunk; ``labels`` an extension field of the
  request (the label set, ``zh`` by default), and so is vLLM's ``min_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobqueue.protocol import MAX_NEW_TOKENS_LIMIT, MAX_TEMPERATURE, JobRecord, JobStatus, LabelSetName


class ChatRequestError(ValueError):
    """A request this endpoint cannot serve: ``param`` names its field, as OpenAI's errors do."""

    def __init__(self, param: str | None, message: str):
        self.param = param
        super().__init__(message)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    #: Text, or a list of text parts (joined by newlines); an assistant's may be null.
    content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError('only text parts ({"type": "text", "text": "..."}) are supported')
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: One more chunk before ``[DONE]``, with ``usage`` and no choices.
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields this endpoint reads; any other OpenAI field is accepted and ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    #: Any name: the answer reports the model that served it.
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    #: Tools cannot be called: a request that offers some is refused rather than answered without them.
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    #: Extensions: the sentiment's label set (zh, en, zh3, en3), and vLLM's ``min_tokens`` (the job's
    #: ``min_new_tokens``: EOS is ignored until then; benchmarks fix a reply's length with it).
    labels: LabelSetName = "zh"
    min_tokens: Annotated[int, Field(ge=0, le=MAX_NEW_TOKENS_LIMIT)] | None = None


@dataclass(frozen=True)
class ChatJob:
    """What ``Client.submit`` gets for one request."""

    text: str
    #: Earlier (user, assistant) turns, oldest first; None when the text is the first message.
    history: list[tuple[str, str]] | None
    max_new_tokens: int | None
    min_new_tokens: int | None
    temperature: float | None
    labels: str
    #: The index of the message that is the text (errors about the text name it).
    text_index: int


def chat_job(request: ChatCompletionRequest) -> ChatJob:
    """The job of one request; ChatRequestError when its last message is not the user's."""
    last = len(request.messages) - 1
    if request.messages[last].role != "user":
        raise ChatRequestError(f"messages[{last}].role", "the last message must be the user's: it is the text "
                                                         "the reply answers")
    limit = request.max_completion_tokens or request.max_tokens
    return ChatJob(
        text=request.messages[last].content or "",
        history=earlier_turns(request.messages[:last]) or None,
        max_new_tokens=None if limit is None else min(limit, MAX_NEW_TOKENS_LIMIT),
        min_new_tokens=request.min_tokens,
        temperature=request.temperature,
        labels=request.labels,
        text_index=last,
    )


def earlier_turns(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(user, assistant) turns: each run of user messages with the assistant messages after it.

    An assistant message with no user message before it has an empty user side; user messages
    left unanswered make a turn with an empty assistant side (as a stored turn cut by its deadline)."""
    turns: list[tuple[str, str]] = []
    users: list[str] = []
    assistants: list[str] = []
    for message in messages:
        if message.role == "user":
            if assistants:
                turns.append(("\n".join(users), "\n".join(assistants)))
                users, assistants = [], []
            users.append(message.content or "")
        elif message.role == "assistant":
            assistants.append(message.content or "")
    if users or assistants:
        turns.append(("\n".join(users), "\n".join(assistants)))
    return turns


#: The job's fields, as its validation names them, under the request's names.
_JOB_FIELDS = {"history": "messages", "options.max_new_tokens": "max_completion_tokens",
               "options.temperature": "temperature", "options.labels": "labels",
               "options.min_new_tokens": "min_tokens"}


def request_param(job_field: str, job: ChatJob) -> str:
    """The request's field behind a field of its job (``text`` is the last message's content)."""
    if job_field == "text":
        return f"messages[{job.text_index}].content"
    return _JOB_FIELDS.get(job_field, job_field)


def validation_param(location: tuple[Any, ...]) -> str | None:
    """FastAPI's location of a body problem as OpenAI names it: ``("body", "messages", 2, "role")`` is
    ``messages[2].role``."""
    parts = [part for part in location if part != "body"]
    param = ""
    for part in parts:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


# --- answers -------------------------------------------------------------------------------

#: The record's stop_reason as OpenAI's finish_reason: a reply cut by its deadline was cut short.
_FINISH_REASONS = {"eos": "stop", "length": "length", "deadline": "length"}


def finish_reason(record: JobRecord) -> str:
    if record.flagged is not None:  # the safety filter answered instead of the model
        return "content_filter"
    return _FINISH_REASONS.get(record.stop_reason or "eos", "stop")


def completion_id(job_id: str) -> str:
    """The answer's id names the job, whose record GET /v1/jobs/{job_id} reads."""
    return f"chatcmpl-{job_id}"


def sentiment_of(record: JobRecord) -> dict[str, Any] | None:
    if record.sentiment is None:
        return None
    return {"label": record.sentiment.label, "confidence": record.sentiment.confidence}


def usage_of(record: JobRecord) -> dict[str, int]:
    prompt = record.tokens.reply_prompt_tokens or 0
    generated = record.tokens.generated_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion(record: JobRecord, requested_model: str) -> dict[str, Any]:
    """A succeeded job's ``chat.completion``."""
    assert record.status is JobStatus.SUCCEEDED, record.status
    return {
        "id": completion_id(record.job_id),
        "object": "chat.completion",
        "created": int(record.submitted_at),
        "model": record.model_id or requested_model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": record.reply or ""},
                     "logprobs": None, "finish_reason": finish_reason(record)}],
        "usage": usage_of(record),
        "system_fingerprint": None,
        "sentiment": sentiment_of(record),
    }


class ChunkWriter:
    """A job's records, as they change, written as ``chat.completion.chunk`` objects.

    The first chunk (role, empty content and ``sentiment``) waits for the sentiment. Each later
    one carries the text the reply grew by; the last one the finish reason (and, asked for, one
    with the usage). A final reply that does not extend what was sent (the safety filter's
    message after partials, or a reply its limit cut back to a sentence's end) adds nothing.
    """

    def __init__(self, job_id: str, requested_model: str, include_usage: bool):
        self.job_id, self.model, self.include_usage = job_id, requested_model, include_usage
        self.started = False
        self.sent = ""
        self.created: int | None = None

    def chunks(self, record: JobRecord) -> list[dict[str, Any]]:
        """The chunks this record adds (none before the sentiment is known). A job that ended
        otherwise than succeeded is the caller's to report (``record.status``)."""
        if not self.started and record.sentiment is None and not record.status.is_final:
            return []
        self.model = record.model_id or self.model
        self.created = self.created or int(record.submitted_at)
        out = []
        if not self.started:
            self.started = True
            out.append(self._chunk({"role": "assistant", "content": ""}, sentiment=sentiment_of(record)))
        text = record.reply or ""
        if record.status in (JobStatus.RUNNING, JobStatus.SUCCEEDED) and text.startswith(self.sent) \
                and len(text) > len(self.sent):
            out.append(self._chunk({"content": text[len(self.sent):]}))
            self.sent = text
        if record.status is JobStatus.SUCCEEDED:
            out.append(self._chunk({}, finish=finish_reason(record)))
            if self.include_usage:
                out.append({**self._chunk({}), "choices": [], "usage": usage_of(record)})
        return out

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": completion_id(self.job_id), "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
