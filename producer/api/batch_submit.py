"""Queueing a batch's jobs: all or none, and with an ``Idempotency-Key`` once per key.

Without a key every job is submitted through ``Client.submit`` in order; a queue that fills (or a
Redis that goes) part way cancels the jobs queued so far, and the error is raised.

With a key the batch is claimed first (``jobqueue.batches.BatchClaims``), which fixes its id and its
requests' digest before any job is queued:

- ``new``: this gateway queues the jobs, each under an idempotency key of its own made of the batch id
  and the job's index, renewing the claim's lease (LEASE_S) as it goes; then the batch record, then
  the claim is marked done. A refused batch (queue full) releases the claim first, then cancels its
  jobs, so a retry makes a new batch.
- ``done``: the batch's id, nothing queued. ``conflict``: another request's key, refused (422).
- ``busy``: another gateway (another thread) is queueing it: wait, polling the claim, up to WAIT_S
  (then 409 ``batch_in_progress``).
- ``resume``: that gateway's lease lapsed (it crashed between the claim and the record): this one
  queues the batch again under the same id; the jobs' own keys answer the jobs already queued, so the
  batch has each job once.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator

import redis

from jobqueue.batches import BatchClaims, BatchStore, Claimed, batch_digest
from jobqueue.errors import AlreadyFinal, BrokerUnavailable, InvalidRequest, JobNotFound, QueueFull
from jobqueue.protocol import JobRequest
from producer.client import Client

#: How long a gateway queueing a batch under a key holds it without renewing (it renews every third).
LEASE_S = 10.0
#: How long a retry waits for another gateway queueing the same batch, before 409 batch_in_progress.
WAIT_S = 30.0
#: How often a waiting retry reads the claim.
POLL_S = 0.05


class BatchInProgress(Exception):
    """The batch of this key is still being queued (by another request) after WAIT_S."""

    def __init__(self, key: str):
        super().__init__(f"the batch of Idempotency-Key {key!r} is still being queued by an earlier request; "
                         "send it again in a moment: it answers that batch")


def job_idempotency_key(batch_id: str, index: int) -> str:
    """The idempotency key of a keyed batch's job: a takeover (``resume``) finds the jobs queued already."""
    return f"batch {batch_id} {index}"


@contextlib.contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as err:
        raise BrokerUnavailable(f"{what}: {type(err).__name__}") from None


def submit_all(client: Client, requests: list[JobRequest], job_key: Callable[[int], str] | None = None,
               progress: Callable[[], None] | None = None, before_cancel: Callable[[], None] | None = None,
               ) -> list[str]:
    """Queue every request as a bulk job, in order (each under ``job_key(index)``, if given); if the
    queue fills (or Redis goes) part way, call ``before_cancel``, cancel the jobs queued so far and
    raise the error, its message saying so."""
    job_ids: list[str] = []
    try:
        for index, request in enumerate(requests):
            job_ids.append(client.submit(request.text, tenant=request.tenant, priority="bulk",
                                         idempotency_key=job_key(index) if job_key else None,
                                         **request.options.model_dump(exclude_none=True)))
            if progress is not None:
                progress()
    except (QueueFull, BrokerUnavailable, InvalidRequest) as err:
        if before_cancel is not None:
            with contextlib.suppress(BrokerUnavailable):
                before_cancel()
        _cancel(client, job_ids)
        if not isinstance(err, InvalidRequest):
            err.args = (f"{err} (the batch stopped at job {len(job_ids)}; the {len(job_ids)} jobs it had "
                        "queued were cancelled: nothing of it runs)",)
        raise
    return job_ids


def _cancel(client: Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        try:
            client.cancel(job_id)
        except (AlreadyFinal, JobNotFound, BrokerUnavailable):
            pass  # it ran already (a fast worker), or Redis is gone: the message still holds for the rest


class BatchSubmitter:
    """Queues a batch's checked requests and writes its record; once per idempotency key."""

    def __init__(self, client: Client, store: BatchStore, claims: BatchClaims):
        self.client, self.store, self.claims = client, store, claims

    def submit(self, requests: list[JobRequest], tenant: str | None, key: str | None) -> str:
        """The batch's id: a new batch's, or (with ``key``) the one the key names."""
        if key is None:
            job_ids = submit_all(self.client, requests)
            with _redis_errors("the batch record could not be written"):
                return self.store.create(tenant, job_ids).batch_id
        claimed = self._claim(requests, tenant, key)
        if claimed.outcome == "done":
            return claimed.batch_id
        job_ids = submit_all(self.client, requests, job_key=lambda index: job_idempotency_key(claimed.batch_id, index),
                             progress=self._renewer(claimed),
                             before_cancel=lambda: self._settle(self.claims.release, claimed))
        with _redis_errors("the batch record could not be written"):
            self.store.create(tenant, job_ids, claimed.batch_id)
        self._settle(self.claims.finish, claimed)
        return claimed.batch_id

    def _claim(self, requests: list[JobRequest], tenant: str | None, key: str) -> Claimed:
        """Claim ``key`` for these requests, waiting while another request queues the same batch."""
        digest, owner = batch_digest(requests), uuid.uuid4().hex
        deadline = time.monotonic() + WAIT_S
        while True:
            with _redis_errors("the Idempotency-Key could not be claimed"):
                claimed = self.claims.claim(tenant, key, digest, owner)
            if claimed.outcome == "conflict":
                problem = (f"{key!r} was used for another batch ({claimed.batch_id}) in the last RESULT_TTL_S; "
                           "send that batch again, or use a new key")
                raise InvalidRequest(f"idempotency_key: {problem}", [("idempotency_key", problem)])
            if claimed.outcome != "busy":
                return claimed
            if time.monotonic() > deadline:
                raise BatchInProgress(key)
            time.sleep(POLL_S)

    def _renewer(self, claimed: Claimed) -> Callable[[], None]:
        renewed = time.monotonic()

        def renew() -> None:
            nonlocal renewed
            if time.monotonic() - renewed > LEASE_S / 3:
                self._settle(self.claims.renew, claimed)
                renewed = time.monotonic()
        return renew

    @staticmethod
    def _settle(step: Callable[[Claimed], object], claimed: Claimed) -> None:
        with _redis_errors("the Idempotency-Key's claim could not be updated"):
            step(claimed)
