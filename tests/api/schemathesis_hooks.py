"""Schemathesis hooks (``SCHEMATHESIS_HOOKS``): hostile bodies that its generators never produce.

Schemathesis generates JSON that a standard encoder can write, so it never
sends a non-finite number (``1e999``, ``NaN``), a lone surrogate escape, or a
body over the size limit. These cases are added to its examples phase for
POST /v1/jobs, where all of its checks run on them (no 5xx, a documented status
and body); each answer's status is also written to ``HOSTILE_ANSWERS_FILE``
for the test to check that they ran and what they got.
"""

from __future__ import annotations

import itertools
import json
import os
import re

import schemathesis
from schemathesis.generation.meta import CoverageScenario

from jobqueue.protocol import IDEMPOTENCY_KEY_PATTERN

HOSTILE_ANSWERS_FILE = "hostile-answers.jsonl"

#: (name, raw body, the status it must get).
HOSTILE_BODIES = [
    ("temperature 1e999", b'{"text": "x", "temperature": 1e999}', 422),
    ("temperature NaN", b'{"text": "x", "temperature": NaN}', 422),
    ("max_new_tokens -Infinity", b'{"text": "x", "max_new_tokens": -Infinity}', 422),
    ("lone surrogate in conversation_id", b'{"text": "x", "conversation_id": "\\ud800"}', 422),
    ("lone surrogate in an extra key", b'{"text": "x", "\\ud800": 1}', 422),
    ("extra key with 1e999", b'{"text": "x", "extra": 1e999}', 422),
    ("body over the limit", b'{"text": "' + b"x" * (64 * 1024 + 1) + b'"}', 413),
]
_NAME_HEADER = "X-Hostile-Case"


@schemathesis.hook
def before_add_examples(context, examples):
    operation = context.operation
    if operation is None or operation.method.upper() != "POST" or operation.path != "/v1/jobs":
        return
    for name, body, _ in HOSTILE_BODIES:
        examples.append(operation.Case(body=body, media_type="application/json", headers={_NAME_HEADER: name}))


@schemathesis.hook
def after_call(context, case, response):
    name = (case.headers or {}).get(_NAME_HEADER)
    if name is not None:
        with open(os.path.join(os.getcwd(), HOSTILE_ANSWERS_FILE), "a", encoding="utf-8") as answers:
            answers.write(json.dumps({"case": name, "status": response.status_code}) + "\n")


_calls = itertools.count()


@schemathesis.hook
def map_headers(context, headers):
    """Each drawn idempotency key is made unique: the fuzzer reuses a valid key with another body,
    which the gateway refuses by design (422, tests/test_idempotency.py) and schemathesis would count
    as a valid request rejected. A key outside the schema is left as drawn, to be refused."""
    for name, key in list((headers or {}).items()):
        if name.lower() == "idempotency-key" and isinstance(key, str) and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key):
            prefix = f"{next(_calls)}-"
            headers[name] = prefix + key[-(255 - len(prefix)):]
    return headers


@schemathesis.hook
def before_call(context, case, kwargs):
    """The same for the cases the coverage phase writes (map_headers does not see them), except the
    case that leaves out X-API-Key: an edit makes schemathesis re-derive a case's metadata, after
    which its missing-header check misreads that case."""
    data = getattr(getattr(case.meta, "phase", None), "data", None)
    if getattr(data, "scenario", None) == CoverageScenario.MISSING_PARAMETER:
        return
    map_headers(context, case.headers)
