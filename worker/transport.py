"""Kombu's Redis transport, made to survive undecodable messages.

Anyone who can write to Redis can push bytes that are not a kombu envelope
into the queue. Stock kombu raises while decoding them and the worker stops
with "Unrecoverable error". This channel logs and drops such a message (it
was already popped, so nothing else is lost) and keeps consuming.

Selected with Celery's ``broker_transport`` setting; ``REDIS_URL`` stays a
plain ``redis://`` URL.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger("qwen_allinone.worker")


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (ValueError, KeyError, TypeError) as err:
            # JSON that does not decode, or decodes to something that is not an envelope.
            log.error("dropped an undecodable message from the queue: %s: %s", type(err).__name__, err)
            return True


class Transport(kombu_redis.Transport):
    Channel = Channel
