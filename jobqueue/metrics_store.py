"""Reading the counters that workers write with each final record (``jobqueue.record.writes.put_final``).

The gateway's ``/metrics`` and ``Client.read_metrics`` read them here, in one
round trip; the keys are listed in ``jobqueue.keys``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from jobqueue.protocol import METRICS_CACHE_KEY, METRICS_JOBS_KEY, METRICS_TENANT_JOBS_KEY, STAGES, metrics_stage_key


@dataclass
class StageHistogram:
    """One stage's latency counts as stored: jobs per bucket (not cumulative), by upper bound."""

    buckets: dict[str, int] = field(default_factory=dict)  # "0.5" → jobs with 0.25 < s <= 0.5; "+Inf" → over the last
    count: int = 0
    sum_s: float = 0.0


@dataclass
class JobMetrics:
    jobs_by_status: dict[str, int] = field(default_factory=dict)
    #: Result-cache lookups: ``sentiment_hits``, ``sentiment_misses``, ``reply_hits``, ``reply_misses``.
    cache_lookups: dict[str, int] = field(default_factory=dict)
    stages: dict[str, StageHistogram] = field(default_factory=dict)
    #: Finished jobs by (tenant, final status), for jobs with a tenant.
    jobs_by_tenant: dict[tuple[str, str], int] = field(default_factory=dict)


def read_metrics(client: redis.Redis) -> JobMetrics:
    """Every job counter, cache counter and stage histogram, read in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(METRICS_JOBS_KEY)
        pipe.hgetall(METRICS_CACHE_KEY)
        pipe.hgetall(METRICS_TENANT_JOBS_KEY)
        for stage in STAGES:
            pipe.hgetall(metrics_stage_key(stage))
        jobs_raw, cache_raw, tenants_raw, *stages_raw = pipe.execute()
    metrics = JobMetrics(jobs_by_status={k.decode(): int(v) for k, v in jobs_raw.items()},
                         cache_lookups={k.decode(): int(v) for k, v in cache_raw.items()})
    for key, count in tenants_raw.items():
        status, _, tenant = key.decode().partition(":")
        metrics.jobs_by_tenant[(tenant, status)] = int(count)
    for stage, raw in zip(STAGES, stages_raw):
        fields = {k.decode(): v for k, v in raw.items()}
        metrics.stages[stage] = StageHistogram(
            buckets={k.removeprefix("le:"): int(v) for k, v in fields.items() if k.startswith("le:")},
            count=int(fields.get("count", 0)),
            sum_s=float(fields.get("sum", 0.0)),
        )
    return metrics
