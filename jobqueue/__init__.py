"""The shared core: what a producer and a worker both know about a job.

Both sides depend on it; it depends on neither (an import-linter contract in
pyproject.toml, checked by the test suite):

- ``protocol``: the job's message and record, their limits (and the key names, re-exported);
- ``keys``: every Redis key, its type and what it holds;
- ``record``: the one writer of a job's record, and its Lua pieces;
- ``cancel``: what cancelling a queued, running or final job does;
- ``store``: the record store's reads (``JobStore``), conversations, batches, metrics;
- ``outcome``: a job's final record, stamped, written and logged;
- ``settings``: where the records and the queue live (``QueueSettings``);
- ``errors``: what a submit or a read raises;
- ``queue``: the broker (Redis or RabbitMQ), the one place that knows kombu's and
  Celery's internals.
"""
