"""The queue: the one place that knows kombu's and Celery's internals.

The rest of the code uses this small interface:

- ``QUEUE_TRANSPORT``: Celery's ``broker_transport`` for producers and workers
  (``transport``: hardened reads, liveness bookkeeping, atomic admission).
- ``submission.submit_job``: a job, its record and its pending turn, queued in one step.
- ``Intake``: a pool process takes more waiting jobs for its batch (``intake``).
- ``Heartbeat``: a process that holds messages says it is alive (``liveness``).
- ``Reconciler``: hands back the messages of dead processes and re-sends open jobs
  whose message is gone (``reconciler``).
- ``check_versions``: kombu and Celery are the versions this code was tested on.
- ``brokers``: which broker holds the queue (BROKER_URL): Redis, with all of the
  above, or RabbitMQ (``amqp``), which hands a dead consumer's messages back itself
  and needs only the unsent-job marks, its own intake and a bounded queue declaration.

Everything below is about the Redis transport; ``amqp`` uses py-amqp's and kombu's
public API only (``Queue.get``, ``basic_recover``, ``basic_publish``, publisher confirms).

kombu's Redis internals used here: ``Channel._put``, ``_brpop_read``,
``_q_for_pri``, ``sep``, ``PRIORITY_STEPS``, ``unacked_key`` and
``unacked_index_key``; ``QoS.append``, ``ack``, ``reject``, ``restore_by_tag``,
``restore_unacked``, ``_flush``, ``_delivered`` and ``_remove_from_indices``; ``Channel.closed``;
and the unacked entry's format ``[payload, exchange, routing_key]``.
"""

from __future__ import annotations

from importlib.metadata import version

from kombu.serialization import register
from kombu.utils import json as kombu_json

from jobqueue.protocol import QUEUE_NAME, TASK_NAME

#: The messages' serializer: kombu's JSON with text as UTF-8 rather than ``\uXXXX`` escapes, the same
#: content type (``application/json``), so any JSON reader, kombu's included, decodes it as before.
#: A Chinese character costs 3 bytes, not 6, and 4 and 8 once the transport's base64 is applied: a
#: job of 2,000 Chinese characters queued in Redis is about half the size.
WIRE_SERIALIZER = "json-utf8"


def _dumps_utf8(obj: object) -> str:
    text = kombu_json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a foreign message put back, say): escaped, as before
        return kombu_json.dumps(obj)
    return text


register(WIRE_SERIALIZER, _dumps_utf8, kombu_json.loads, content_type="application/json", content_encoding="utf-8")

#: Celery's wire format, the same for producers and workers. Only JSON crosses the wire: a pickle
#: payload is refused, never deserialized.
CELERY_WIRE_CONFIG = {
    "task_serializer": WIRE_SERIALIZER,
    "result_serializer": WIRE_SERIALIZER,
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_default_queue": QUEUE_NAME,
    "task_routes": {TASK_NAME: {"queue": QUEUE_NAME}},
    # Our own records are the results; Celery's result backend is not used.
    "task_ignore_result": True,
}

#: Celery's ``broker_transport`` setting that selects our Redis transport.
QUEUE_TRANSPORT = "jobqueue.queue.transport:Transport"

#: The minor versions the suite ran on; the internals above may change in any other.
TESTED_VERSIONS = {"kombu": "5.7", "celery": "5.7"}


def check_versions() -> str | None:
    """None when kombu and Celery are the tested minor versions, else one line saying what differs."""
    found = {name: version(name) for name in TESTED_VERSIONS}
    wrong = [f"{name} {found[name]}" for name, minor in TESTED_VERSIONS.items()
             if not (found[name] == minor or found[name].startswith(minor + "."))]
    if not wrong:
        return None
    tested = ", ".join(f"{name} {minor}.x" for name, minor in TESTED_VERSIONS.items())
    return (f"{' and '.join(wrong)} installed, but jobqueue/queue/ uses kombu internals tested only with "
            f"{tested}; install those (pip install -e .[worker])")


def transport_options(visibility_timeout_s: int) -> dict:
    """Celery's ``broker_transport_options`` for the worker."""
    return {
        # The last resort: the reconciler hands a dead worker's messages back within
        # seconds (LIVENESS_TTL_S); kombu's sweep catches what it cannot.
        "visibility_timeout": visibility_timeout_s,
        # Sweep for messages of dead workers often enough for a short visibility timeout.
        "unacked_restore_interval": max(1, min(10, visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
    }
