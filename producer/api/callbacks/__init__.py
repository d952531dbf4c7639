"""Completion callbacks: the gateway POSTs a final record to its job's ``callback_url``.

The worker never makes a network call of this kind: the final-record script adds a job with a
callback to ``CALLBACKS_KEY`` (scored by when to try), unless its own client cancelled it (and
did not ask for ``callback_on_cancel``) or its host or tenant already has
CALLBACK_MAX_PENDING_PER_HOST / _PER_TENANT pending. Every gateway with CALLBACK_SECRET runs a
``CallbackSender`` that polls it. A gateway claims a due job by moving its score a lease ahead
(``ledger``), so with several gateways one sends at a time; the lease outlasts an attempt's
deadline, and a gateway that dies mid-send loses only its lease.

Each attempt is a task of its own, at most CALLBACK_MAX_CONCURRENT at once and half of those for
one host, so a slow receiver delays no other. One deadline, CALLBACK_TIMEOUT_S, bounds the whole
attempt (resolving, connecting, sending, reading), and at most 1 KiB of the answer is read.

Before sending, the URL is checked again against the allow-list (the tenant's own from
API_KEYS, else CALLBACK_ALLOWED_HOSTS), and its host is resolved: a private, loopback or
link-local address is refused unless it is itself an entry (``127.0.0.1:9000``). The POST goes
to the address checked. A refused callback is given up with a log line, never retried.

The body is the record's JSON, exactly as ``GET /v1/jobs/{id}`` returns it, signed per Standard
Webhooks (``webhook-id``: the job id, ``webhook-timestamp``, ``webhook-signature``: ``v1,`` and
the base64 HMAC-SHA256 of ``id.timestamp.body``) with the ``standardwebhooks`` library. A 2xx
answer ends it; anything else (an error status, a refused connection, the deadline) is retried
after 1, 2, 4 ... s (at most 60 s) for CALLBACK_RETRY_FOR_S after the first try, then given up
with a log line; a job whose record expired meanwhile is dropped. Redirects are not followed.
"""

from producer.api.callbacks.delivery import Refused, signed_headers
from producer.api.callbacks.ledger import Ledger
from producer.api.callbacks.sender import CallbackSender

__all__ = ["CallbackSender", "Ledger", "Refused", "signed_headers"]
