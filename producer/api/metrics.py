"""Prometheus metrics of the whole service, read from Redis at scrape time.

Workers count every final record into Redis (``JobStore.record_outcome``), so
``/metrics`` covers every job, not only those submitted through this gateway,
and any number of gateways report the same figures.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from producer.client import Client
from jobqueue.protocol import CACHE_KINDS, STAGE_BUCKETS_S, JobStatus

FINAL_STATUSES = [status.value for status in JobStatus if status.is_final]


class QueueCollector:
    """Queue depth, jobs by final status and per-stage latency histograms, for prometheus-client."""

    def __init__(self, client: Client):
        self.client = client

    def describe(self) -> Iterator[Metric]:
        # Names only: registering the collector must not need Redis.
        yield GaugeMetricFamily("qwen_allinone_queue_depth", _QUEUE_DOC)
        yield CounterMetricFamily("qwen_allinone_jobs", _JOBS_DOC, labels=["status"])
        yield HistogramMetricFamily("qwen_allinone_stage_seconds", _STAGE_DOC, labels=["stage"])
        yield CounterMetricFamily("qwen_allinone_cache_lookups", _CACHE_DOC, labels=["kind", "result"])
        yield GaugeMetricFamily("qwen_allinone_tenant_queue_depth", _TENANT_QUEUE_DOC, labels=["tenant"])
        yield CounterMetricFamily("qwen_allinone_tenant_jobs", _TENANT_JOBS_DOC, labels=["tenant", "status"])

    def collect(self) -> Iterator[Metric]:
        # Raises BrokerUnavailable when Redis is down; the /metrics route answers 503 then.
        depth = self.client.queue_depth()
        metrics = self.client.read_metrics()
        yield GaugeMetricFamily("qwen_allinone_queue_depth", _QUEUE_DOC, value=depth)

        jobs = CounterMetricFamily("qwen_allinone_jobs", _JOBS_DOC, labels=["status"])
        # Every final status is shown, 0 included, so that rate() works from the first job.
        for status in FINAL_STATUSES:
            jobs.add_metric([status], metrics.jobs_by_status.get(status, 0))
        yield jobs

        stages = HistogramMetricFamily("qwen_allinone_stage_seconds", _STAGE_DOC, labels=["stage"])
        for stage, histogram in metrics.stages.items():
            # Redis holds the count of each bucket alone; Prometheus wants them cumulative.
            cumulative, buckets = 0, []
            for bound in STAGE_BUCKETS_S:
                cumulative += histogram.buckets.get(f"{bound:g}", 0)
                buckets.append((floatToGoString(bound), cumulative))
            buckets.append(("+Inf", histogram.count))
            stages.add_metric([stage], buckets, sum_value=histogram.sum_s)
        yield stages

        lookups = CounterMetricFamily("qwen_allinone_cache_lookups", _CACHE_DOC, labels=["kind", "result"])
        for kind in CACHE_KINDS:
            for result, counter in (("hit", "hits"), ("miss", "misses")):
                lookups.add_metric([kind, result], metrics.cache_lookups.get(f"{kind}_{counter}", 0))
        yield lookups
        yield from self._per_tenant(metrics.jobs_by_tenant)

    def _per_tenant(self, jobs_by_tenant: dict[tuple[str, str], int]) -> Iterator[Metric]:
        """Waiting and finished jobs by tenant name (API_KEYS' names; never a key)."""
        depths = self.client.tenant_queue_depths()
        tenant_depth = GaugeMetricFamily("qwen_allinone_tenant_queue_depth", _TENANT_QUEUE_DOC, labels=["tenant"])
        # Every tenant seen finishing a job is shown, at 0 when none of its jobs waits.
        for tenant in sorted({tenant for tenant, _ in jobs_by_tenant} | set(depths)):
            if tenant:
                tenant_depth.add_metric([tenant], depths.get(tenant, 0))
        yield tenant_depth
        tenant_jobs = CounterMetricFamily("qwen_allinone_tenant_jobs", _TENANT_JOBS_DOC, labels=["tenant", "status"])
        for (tenant, status), count in sorted(jobs_by_tenant.items()):
            tenant_jobs.add_metric([tenant, status], count)
        yield tenant_jobs


def build_registry(client: Client) -> CollectorRegistry:
    # A registry of our own, not the global one: each app built by create_app has its own.
    registry = CollectorRegistry()
    registry.register(QueueCollector(client))
    return registry


_QUEUE_DOC = "Jobs waiting in the queue for a worker (not counting running jobs)."
_CACHE_DOC = ("Result-cache lookups (CACHE_TTL_S) by kind (sentiment, reply) and result (hit, miss); "
              "the hit rate is hits / (hits + misses).")
_TENANT_QUEUE_DOC = "Jobs of each tenant (API_KEYS' names) waiting in the queue; Redis only (none on RabbitMQ)."
_TENANT_JOBS_DOC = "Jobs of each tenant (API_KEYS' names) that reached a final status, by status."
_JOBS_DOC = "Jobs that reached a final status, counted by the worker that finished them."
_STAGE_DOC = "Seconds per stage of finished jobs: queue_wait, sentiment, reply, and total (submission to final status)."
