"""What one worker process holds, fixed once it has started: settings, the Redis stores, the model.

The state that changes from batch to batch has the module that changes it as its owner:
``worker.joining.JoiningState`` (the last batch's size, the shutdown's stop switch) and
``worker.tasks.RedisOutage`` (failures in a row, the pool process waiting for Redis). The
Celery task holds one of each for its process."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from jobqueue.store import JobStore, connect_redis
from worker.cache import ResultCache
from worker.safety import SafetyFilter
from worker.engine import Engine
from jobqueue.queue.amqp import AmqpIntake
from jobqueue.queue.intake import Intake
from worker.engine.adapter import ADAPTER_NEEDS_TORCH, ClassifierAdapter, load_adapter
from worker.engine.model_source import ModelLoadError, ModelSource, choose_engine, resolve_model_source
from worker.settings import WorkerSettings

log = logging.getLogger("qwen_allinone.worker")


@dataclass
class WorkerRuntime:
    """Settings, the Redis stores and (in pool processes) the engine: set up once, then only read."""

    settings: WorkerSettings
    source: ModelSource | None = None
    #: CLASSIFIER_ADAPTER, read in the parent (NumPy only) and inherited by the pool processes.
    adapter: ClassifierAdapter | None = None
    engine: Engine | None = None
    #: SAFETY_WORDS_FILE's terms, read in the parent and inherited by the pool processes.
    safety: SafetyFilter | None = None
    #: Takes more waiting jobs for a batch; set by register().
    intake: Intake | AmqpIntake | None = None
    _store: JobStore | None = field(default=None, repr=False)
    _parent_store: JobStore | None = field(default=None, repr=False)
    _cache: ResultCache | None = field(default=None, repr=False)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            # About 30 s of reconnects: a Redis restart does not fail the running job.
            client = connect_redis(self.settings.redis_url, retries=20, socket_timeout=30)
            self._store = JobStore(client, self.settings.result_ttl_s)
        return self._store

    @property
    def cache(self) -> ResultCache:
        if self._cache is None:
            self._cache = ResultCache(self.store.redis, self.settings.cache_ttl_s, self.settings.cache_scope)
        return self._cache

    @property
    def parent_store(self) -> JobStore:
        """The store for the parent's hard-time-limit bookkeeping, which runs on Celery's event loop.

        A few seconds at most, not ``store``'s 30 s of reconnects: the parent also
        consumes, acknowledges and heartbeats. A write given up here is left to the
        reconciler, which finds the job open and re-sends it.
        """
        if self._parent_store is None:
            client = connect_redis(self.settings.redis_url, retries=1, socket_timeout=2)
            self._parent_store = JobStore(client, self.settings.result_ttl_s)
        return self._parent_store

    def resolve_model(self) -> ModelSource:
        """MODEL as files on disk, ENGINE checked against it, CLASSIFIER_ADAPTER and SAFETY_WORDS_FILE
        read (no torch, no llama.cpp)."""
        if self.safety is None and self.settings.safety_words_file:
            try:
                self.safety = SafetyFilter.from_file(self.settings.safety_words_file)
            except (OSError, UnicodeDecodeError) as err:
                raise ModelLoadError(f"SAFETY_WORDS_FILE={self.settings.safety_words_file!r}: {err}") from err
        if self.source is None:
            source = resolve_model_source(self.settings.model)
            engine = choose_engine(self.settings.engine, source)
            if self.settings.classifier_adapter:
                self.adapter = load_adapter(self.settings.classifier_adapter)
                if engine != "torch" and self.adapter.changes_the_pass:
                    raise ModelLoadError(ADAPTER_NEEDS_TORCH)
            self.source = source
        return self.source

    def load_engine(self) -> Engine:
        if self.engine is None:
            from worker.engine import load_engine  # torch is imported here, inside the pool process

            started = time.perf_counter()
            settings = self.settings
            self.engine = load_engine(
                self.resolve_model(), settings.dtype, settings.threads, engine=settings.engine,
                prompt_variant=settings.classifier_prompt, positive_threshold=settings.positive_threshold,
                adapter=self.adapter, reply_variant=settings.reply_prompt, controls=settings.reply_controls,
                kv_cache_tokens=settings.batch_max * settings.kv_tokens_per_job, max_rows=settings.batch_max,
            )
            info = self.engine.info()
            log.info(
                "model %s loaded (dtype=%s, engine=%s, threads=%d) in %.1fs",
                settings.model, self.engine.dtype_name, info.name, info.threads, time.perf_counter() - started,
            )
        return self.engine
