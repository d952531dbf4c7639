"""The two bodies of ``POST /v1/batches``, read into job requests, with every problem named.

- JSON (``application/json``): ``{"texts": [...], <options>}``; FastAPI reads it (``SubmitBatch``), and
  each text is checked here by the job request's own rules (``texts[i]: ...``).
- JSON lines (``application/x-ndjson`` or ``application/jsonl``): one whole job request a line, the
  fields of ``POST /v1/jobs`` that a batch job takes (``text``, ``max_new_tokens``,
  ``min_new_tokens``, ``temperature``, ``labels``; ``priority`` only ``bulk``). A bad line is named by
  its line number (1-based, blank lines counted and skipped) and its field: ``line 3: text: ...``.

Either way every job is checked before any is queued: all or none.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ValidationError, create_model

from jobqueue.protocol import JobOptions, JobRequest, validation_problems
from producer.api.limits import printable_errors

#: Content types read as JSON lines.
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl"})
#: At most this many problems are named in a refused batch's 422 (the first ones, by position).
MAX_PROBLEMS_SHOWN = 50
#: Fields of POST /v1/jobs that a batch's jobs never take.
JOB_ONLY_FIELDS = ("conversation_id", "callback_url", "callback_on_cancel", "history")

#: (index of the item, field, message) → (loc, msg) of a 422 problem.
Where = Callable[[int, str, str], tuple[list, str]]


class BatchBodyError(Exception):
    """A refused body: FastAPI-shaped 422 details (``loc``, ``msg``), the first MAX_PROBLEMS_SHOWN."""

    def __init__(self, problems: list[dict]):
        self.problems = printable_errors(problems[:MAX_PROBLEMS_SHOWN])
        super().__init__("; ".join(problem["msg"] for problem in self.problems))


def is_ndjson(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in NDJSON_TYPES


def _problem(loc: list, msg: str, kind: str = "invalid_request") -> dict:
    return {"type": kind, "loc": loc, "msg": msg}


def texts_where(index: int, _field: str, message: str) -> tuple[list, str]:
    """The JSON form's problems: ``["body", "texts", i]``, ``texts[i]: must ...`` (the options are shared)."""
    return ["body", "texts", index], f"texts[{index}]: {message}"


def lines_where(line_numbers: list[int]) -> Where:
    """The JSON lines form's problems: ``["body", "line", n, field]``, ``line n: field: must ...``."""
    def where(index: int, field: str, message: str) -> tuple[list, str]:
        number, name = line_numbers[index], field.removeprefix("options.")
        return ["body", "line", number, *name.split(".")], f"line {number}: {name}: {message}"
    return where


def check_requests(items: list[dict], tenant: str | None, max_input_chars: int, where: Where,
                   unread: list[dict] = ()) -> list[JobRequest]:
    """Each item (``text``, ``options``) as the tenant's bulk job request; raises BatchBodyError naming
    every bad one, and those of ``unread`` (lines that did not read), in order; so nothing is queued."""
    requests, problems = [], list(unread)
    for index, item in enumerate(items):
        try:
            requests.append(JobRequest.model_validate(
                {"text": item["text"], "tenant": tenant, "priority": "bulk", "options": item["options"]},
                context={"max_input_chars": max_input_chars}))
        except ValidationError as err:
            for field, message in validation_problems(err):
                loc, msg = where(index, field, message)
                problems.append(_problem(loc, msg))
    if problems:
        raise BatchBodyError(sorted(problems, key=lambda problem: problem["loc"][2]))
    return requests


def line_model(options_base: type[JobOptions]) -> type[BaseModel]:
    """One line: the text and its own options. The text's rules are the job request's (check_requests)."""
    return create_model("BatchLine", __base__=options_base, text=(str, ...),
                        priority=(Literal["bulk"], "bulk"))


def read_lines(raw: bytes, model: type[BaseModel], max_items: int) -> tuple[list[dict], list[int], list[dict]]:
    """The items (``text``, ``options``) of a JSON lines body that read, their line numbers, and the
    problems of those that did not (for ``check_requests``); raises BatchBodyError for no line or more
    than ``max_items`` (MAX_BATCH_ITEMS)."""
    numbered = [(number, line) for number, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    if not numbered:
        raise BatchBodyError([_problem(["body"], "the body has no job: send one JSON object (a job) a line")])
    if len(numbered) > max_items:
        raise BatchBodyError([_problem(["body"], f"the body has {len(numbered)} jobs (lines), over "
                                                 f"MAX_BATCH_ITEMS ({max_items}): split it into batches")])
    items, numbers, problems = [], [], []
    for number, line in numbered:
        fields, line_problems = _read_line(number, line, model)
        problems += line_problems
        if fields is not None:
            text = fields.pop("text")
            fields.pop("priority", None)
            items.append({"text": text, "options": fields})
            numbers.append(number)
    return items, numbers, problems


def _read_line(number: int, line: bytes, model: type[BaseModel]) -> tuple[dict | None, list[dict]]:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or nested past the parser's depth
        reason = err.msg if isinstance(err, json.JSONDecodeError) else (
            "not UTF-8" if isinstance(err, UnicodeDecodeError) else "nested too deep")
        return None, [_problem(["body", "line", number], f"line {number}: not a JSON object ({reason})", "json_invalid")]
    if not isinstance(data, dict):
        return None, [_problem(["body", "line", number], f"line {number}: must be a JSON object (a job), "
                                                         f"not {type(data).__name__}")]
    try:
        return model.model_validate(data).model_dump(exclude_none=True), []
    except ValidationError as err:
        return None, [_line_problem(number, problem) for problem in err.errors()]


def _line_problem(number: int, problem: dict) -> dict:
    field = ".".join(str(part) for part in problem["loc"]) or "line"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden" and field in JOB_ONLY_FIELDS:
        message = "not taken in a batch (batch jobs are bulk jobs, without conversations or callbacks)"
    elif field == "priority":
        message = "must be bulk (a batch's jobs always go to the bulk lane)"
    return _problem(["body", "line", number, *problem["loc"]], f"line {number}: {field}: {message}", problem["type"])
