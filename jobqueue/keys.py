"""Every Redis key: its name, its type and what it holds, in one module (issue 33).

``jobqueue.protocol`` re-exports these names, so ``from jobqueue.protocol import job_key`` still
works. Nothing here imports the rest of the project: the record's and the timings' types are
named for the type checker only.

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

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobqueue.protocol import JobRecord, Timings

#: Every key but the queue's own list starts with it.
KEY_PREFIX = "qwen-allinone"
#: Celery queue; with the Redis transport it is also the key of the list of waiting messages.
QUEUE_NAME = "qwen-allinone"


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


# --- the stage histograms' fields (``metrics:stage:<stage>``): workers count every final record,
# --- the gateway's /metrics reads them

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
