"""Liveness: which processes are alive, and which queue messages each one holds.

Every process that takes messages off the queue (a worker's parent, which is
Celery's consumer, and its pool process, which takes more for a batch) has a
consumer id and a heartbeat: a key with a short TTL that a thread of its own
refreshes. Each message it holds unacknowledged is in its ``held`` set,
written in the same step as kombu's unacked record (``jobqueue.queue.transport``
and the intake's script). When a process dies its heartbeat lapses within
``LIVENESS_TTL_S`` and the reconciler hands its messages back to the queue,
instead of kombu's visibility timeout (an hour by default) doing it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

import redis

from jobqueue.protocol import CONSUMERS_KEY, consumer_key, held_key, runner_key

log = logging.getLogger("qwen_allinone.worker")

_identity: tuple[int, str] | None = None
_identity_lock = threading.Lock()


def consumer_id() -> str:
    """This process's consumer id: host, pid and a random part (a pid is reused, a restart is new)."""
    global _identity
    with _identity_lock:
        if _identity is None or _identity[0] != os.getpid():
            _identity = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        return _identity[1]


def _forget_identity_in_child() -> None:
    # A forked pool process gets an id of its own, and a fresh lock: the parent's heartbeat
    # thread may have held the old one at the moment of the fork, and would never release it here.
    global _identity, _identity_lock
    _identity, _identity_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_identity_in_child)


#: Claim a job's run for this process, unless another process whose heartbeat is alive runs it.
#: KEYS: the job's runner key. ARGV: this consumer id, the claim's TTL in ms, the consumer key prefix.
#: Returns false (claimed) or the live runner's id.
_CLAIM_SCRIPT = """
local runner = redis.call('GET', KEYS[1])
if runner and runner ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. runner) == 1 then return runner end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""


def claim_run(client: redis.Redis, job_id: str, ttl_s: float) -> str | None:
    """Claim the job's run for this process; None if claimed, else the id of the live process running it.

    A message is handed back when its holder's heartbeat lapses; a holder that was only
    cut off from Redis for that long still runs the job when its copy is delivered again.
    The claim keeps the second copy from running beside the first.
    """
    runner = client.eval(_CLAIM_SCRIPT, 1, runner_key(job_id), consumer_id(), int(ttl_s * 1000),
                         consumer_key(""))
    return runner.decode() if runner else None


#: Drop the claims that are this process's. KEYS: runner keys. ARGV: this consumer id.
_RELEASE_SCRIPT = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
return 0
"""


def release_runs(client: redis.Redis, job_ids: list[str]) -> None:
    """Give up this process's claims on ``job_ids`` (their run ended, finished or handed back)."""
    if job_ids:
        client.eval(_RELEASE_SCRIPT, len(job_ids), *map(runner_key, job_ids), consumer_id())


class Heartbeat:
    """Keeps this process's consumer key alive from a daemon thread; ``stop`` removes it.

    With ``holdings`` (the delivery tags this process has in memory), each beat also gives up what
    its held set records but the process does not have: a pop whose reply was lost (Redis killed
    after running it), or a hand-back that failed as the channel closed on a lost connection. Such
    a message is recorded as held by a live process, so without this only kombu's visibility
    timeout, an hour, would bring it back. A tag is given up when two beats in a row found it
    missing; the reconciler then hands it back like a dead process's. Were it in memory after all
    (a run in flight), its second copy meets that run's claim and waits (``claim_run``).
    """

    def __init__(self, client: redis.Redis, ttl_s: float, holdings: Callable[[], set[str]] | None = None):
        self.client = client
        self.ttl_s = ttl_s
        self.holdings = holdings
        self._missing: set[str] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        me = consumer_id()
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(consumer_key(me), 1, px=int(self.ttl_s * 1000))
            pipe.sadd(CONSUMERS_KEY, me)
            pipe.execute()

    def give_up_orphans(self) -> list[str]:
        """Drop from the held set what two looks in a row found there and not in memory."""
        held = held_key(consumer_id())
        recorded = {raw.decode() for raw in self.client.smembers(held)}  # read before memory: see below
        # A tag recorded just now is in memory by the time it is looked for there, but for a reply
        # still on its way; the second look, a beat later, rules that out.
        missing = recorded - self.holdings()
        orphans = sorted(missing & self._missing)
        self._missing = missing - set(orphans)
        if orphans:
            self.client.srem(held, *orphans)
            log.warning("gave up %d message(s) recorded as held here but not in memory: %s", len(orphans), orphans)
        return orphans

    def start(self) -> Heartbeat:
        try:
            self.beat()  # alive from the start, before the thread's first turn
        except redis.RedisError as err:
            log.warning("heartbeat not written: Redis error %s", err)
        self._thread = threading.Thread(target=self._run, name="qwen-allinone-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        try:
            self.client.delete(consumer_key(consumer_id()))
        except redis.RedisError:
            pass  # it lapses on its own

    def _run(self) -> None:
        # Four beats per TTL: one late or failed beat does not make a live process look dead.
        while not self._stopped.is_set():
            self.beat_once()
            self._stopped.wait(self.ttl_s / 4)

    def beat_once(self) -> None:
        """One beat, then the look for orphans. Nothing the look raises may end this thread: a
        stopped heartbeat makes a live process look dead, and its running jobs run twice."""
        try:
            self.beat()
        except redis.RedisError as err:
            log.warning("heartbeat not written: Redis error %s", err)
            return
        if self.holdings is None:
            return
        try:
            self.give_up_orphans()
        except Exception:
            log.exception("the look for held messages not in memory failed; the next beat tries again")
