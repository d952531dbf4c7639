"""The state one worker process keeps between jobs: settings, the Redis store, the engine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from producer.store import JobStore, connect_redis
from worker.engine import Engine
from worker.intake import Intake
from worker.model_source import ModelSource, resolve_model_source
from worker.settings import WorkerSettings

log = logging.getLogger("qwen_allinone.worker")


@dataclass
class WorkerRuntime:
    """What one worker process holds: settings, the Redis store and (in pool processes) the engine."""

    settings: WorkerSettings
    source: ModelSource | None = None
    engine: Engine | None = None
    #: Takes more waiting jobs for a batch; set by register().
    intake: Intake | None = None
    #: Jobs in this process's previous batch, taken messages included.
    last_batch_size: int = 1
    _store: JobStore | None = field(default=None, repr=False)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            # About 30 s of reconnects: a Redis restart does not fail the running job.
            client = connect_redis(self.settings.redis_url, retries=20, socket_timeout=30)
            self._store = JobStore(client, self.settings.result_ttl_s)
        return self._store

    def resolve_model(self) -> ModelSource:
        if self.source is None:
            self.source = resolve_model_source(self.settings.model)
        return self.source

    def load_engine(self) -> Engine:
        if self.engine is None:
            from worker.engine import load_engine  # torch is imported here, inside the pool process

            started = time.perf_counter()
            self.engine = load_engine(
                self.resolve_model(), self.settings.dtype, self.settings.threads,
                prompt_variant=self.settings.classifier_prompt, positive_threshold=self.settings.positive_threshold,
            )
            log.info(
                "model %s loaded (dtype=%s, threads=%d) in %.1fs",
                self.settings.model, self.settings.dtype, self.settings.threads, time.perf_counter() - started,
            )
        return self.engine
