"""The Celery app: ``celery -A worker.app worker --concurrency 1 --loglevel INFO``.

This module is the worker's composition root: importing it reads the settings
from the environment (Celery needs the app object at import) and wires the
signals that load the model once per pool process. It never imports torch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import warnings

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down
from pydantic import ValidationError

from jobqueue.store import JobStore, connect_redis
from worker.admission import MAX_ATTEMPTS
from worker.engine.model_source import ModelLoadError
from jobqueue.queue import CELERY_WIRE_CONFIG, check_versions, transport_options
from jobqueue.queue.brokers import broker_for, celery_broker_config
from jobqueue.queue.liveness import Heartbeat
from jobqueue.queue.reconciler import Reconciler
from jobqueue.queue.transport import held_in_memory
from jobqueue.settings import settings_problems
from worker.joining import JoiningState
from worker.runtime import WorkerRuntime
from worker.settings import WorkerSettings
from worker.tasks import register

log = logging.getLogger("qwen_allinone.worker")

#: A pool process loads the model before it reports for work. Celery's default
#: (4 s) is shorter than a model load, so a pool process replaced after a hard
#: time limit was killed before it was up, again and again, and no job ran.
POOL_PROCESS_START_TIMEOUT_S = 300.0
WORKER_LOST_WAIT_S = 1.0


def celery_config(settings: WorkerSettings) -> dict:
    return {
        **CELERY_WIRE_CONFIG,
        # BROKER_URL (REDIS_URL when unset); on RabbitMQ, heartbeats often enough that a dead or
        # cut-off worker's messages go back to the queue within about LIVENESS_TTL_S.
        **celery_broker_config(settings, heartbeat_s=settings.broker_heartbeat_s),
        # One job at a time per worker process; the excess waits in Redis, not in memory.
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        # Acknowledge after the job's final record is written; if the worker dies
        # first, the message goes back to the queue.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # When a pool process dies, its job is requeued as lost after this wait (Celery's
        # default, 10 s, lets a short hard time limit fire first: the job was then recorded
        # timed_out although it was killed from outside). Our results are in Redis: no
        # result in flight is worth waiting for.
        "worker_lost_wait": WORKER_LOST_WAIT_S,
        "task_time_limit": settings.hard_time_limit_s,
        "worker_proc_alive_timeout": POOL_PROCESS_START_TIMEOUT_S,
        "broker_connection_retry_on_startup": True,
    } | _redis_queue_config(settings)


def _redis_queue_config(settings: WorkerSettings) -> dict:
    """With the queue in Redis: kombu's Redis transport, hardened against undecodable messages,
    with liveness bookkeeping (jobqueue.queue.transport) and the visibility timeout as last resort."""
    if settings.broker_kind != "redis":
        return {}
    return {"broker_transport_options": transport_options(settings.visibility_timeout_s)}


def quiet_library_notices() -> None:
    """Keep deprecation notices (torch's and transformers', in practice: our own code raises none)
    out of the user's terminal and the worker log: they are addressed to those libraries' callers,
    us, who pin the versions tested."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def create_app(settings: WorkerSettings | None = None) -> Celery:
    quiet_library_notices()
    settings = settings or _settings_from_environment()
    app = Celery("qwen-allinone")
    app.conf.update(celery_config(settings))
    runtime = WorkerRuntime(settings)
    task = register(app, runtime)
    _connect_model_loading(runtime)
    _connect_upkeep(app, runtime, task.joining)
    return app


def _connect_upkeep(app: Celery, runtime: WorkerRuntime, joining: JoiningState) -> None:
    """Heartbeats in the parent and each pool process; the reconciler in the parent."""
    settings = runtime.settings
    running: list = []

    def heartbeat():
        # No retries, and a beat gives up well inside its interval: a beat stuck in retries
        # would let a live process's key lapse, and its messages be handed to another worker.
        client = connect_redis(settings.redis_url, retries=0, socket_timeout=settings.liveness_ttl_s / 4)
        holdings = held_in_memory if settings.broker_kind == "redis" else None
        return Heartbeat(client, settings.liveness_ttl_s, holdings=holdings).start()

    @worker_ready.connect(weak=False)
    def start_parent_upkeep(**_):
        running.append(heartbeat())
        store = JobStore(connect_redis(settings.redis_url, retries=3, socket_timeout=10), settings.result_ttl_s)
        broker = broker_for(settings, store)
        running.append(Reconciler(app, store, amqp=broker if broker.kind == "amqp" else None,
                                  grace_s=settings.reconcile_interval_s,
                                  interval_s=settings.reconcile_interval_s, max_attempts=MAX_ATTEMPTS,
                                  bulk_max_wait_s=settings.bulk_max_wait_s).start())

    @worker_process_init.connect(weak=False)
    def start_pool_heartbeat(**_):
        running.append(heartbeat())

    @worker_shutting_down.connect(weak=False)
    def stop_joining(**_):
        # A warm shutdown waits for the running batch: it must not keep taking new jobs.
        joining.stop()

    @worker_shutdown.connect(weak=False)
    def stop_upkeep(**_):
        for part in running:
            part.stop()


def _connect_model_loading(runtime: WorkerRuntime) -> None:
    # Set by a pool process whose model load failed; shared memory, inherited at fork.
    load_failed = multiprocessing.RawValue("b", 0)

    @worker_init.connect(weak=False)
    def check_model(**_):
        # In the parent, before forking: resolve MODEL to local files (no torch),
        # so a bad setting stops the worker here with one line.
        if problem := check_versions():
            _die(problem)
        try:
            runtime.resolve_model()
        except ModelLoadError as err:
            _die(str(err))

    @worker_process_init.connect(weak=False)
    def load_model(**_):
        # In each pool process, after the fork: torch is safe to start here.
        try:
            runtime.load_engine()
        except Exception as err:  # ModelLoadError, or anything else the load raised
            # Stop the whole worker instead of letting the pool respawn a child that fails again.
            load_failed.value = 1
            os.kill(os.getppid(), signal.SIGTERM)
            _die(str(err) if isinstance(err, ModelLoadError) else f"MODEL={runtime.settings.model!r}: {err!r}")

    @worker_shutdown.connect(weak=False)
    def exit_code(**_):
        # The SIGTERM above is a warm shutdown, which exits 0; a failed start must not.
        if load_failed.value:
            os._exit(1)


def _settings_from_environment() -> WorkerSettings:
    """The settings, or the worker stops with one line per bad setting (its variable, what it accepts)."""
    try:
        return WorkerSettings()
    except ValidationError as err:
        _die(settings_problems(err))
        raise  # not reached: _die exits


def _die(message: str) -> None:
    print(f"qwen-allinone worker: cannot start: {message}", file=sys.stderr, flush=True)
    os._exit(1)


app = create_app()
