"""The heartbeat's second job: giving up held records of messages the process does not have."""

from __future__ import annotations

import fakeredis

from jobqueue.protocol import consumer_key, held_key
from jobqueue.queue.liveness import Heartbeat, consumer_id


def _heartbeat(in_memory: set[str]) -> tuple[Heartbeat, fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    return Heartbeat(client, 10.0, holdings=lambda: set(in_memory)), client


def test_a_record_missing_from_memory_two_looks_in_a_row_is_given_up():
    in_memory = {"kept"}
    heartbeat, client = _heartbeat(in_memory)
    client.sadd(held_key(consumer_id()), "kept", "orphan")
    assert heartbeat.give_up_orphans() == []  # a reply may be on its way: not yet
    assert client.smembers(held_key(consumer_id())) == {b"kept", b"orphan"}
    assert heartbeat.give_up_orphans() == ["orphan"]
    assert client.smembers(held_key(consumer_id())) == {b"kept"}


def test_a_record_that_reached_memory_between_looks_is_kept():
    in_memory: set[str] = set()
    heartbeat, client = _heartbeat(in_memory)
    client.sadd(held_key(consumer_id()), "arriving")
    assert heartbeat.give_up_orphans() == []
    in_memory.add("arriving")  # the pop's reply came
    assert heartbeat.give_up_orphans() == []
    in_memory.discard("arriving")  # settled later: a first look again, not a second
    client.sadd(held_key(consumer_id()), "arriving")
    assert heartbeat.give_up_orphans() == []
    assert client.sismember(held_key(consumer_id()), "arriving")


def test_the_held_set_is_read_before_memory():
    # A record written and delivered between the two reads must not count as missing.
    order: list[str] = []
    heartbeat, client = _heartbeat(set())
    real_smembers = client.smembers

    def smembers(key):
        order.append("redis")
        return real_smembers(key)

    client.smembers = smembers
    heartbeat.holdings = lambda: order.append("memory") or set()
    heartbeat.give_up_orphans()
    assert order == ["redis", "memory"]


def test_a_failing_look_for_orphans_does_not_stop_the_heartbeat():
    def broken() -> set[str]:
        raise AttributeError("a kombu internal moved")

    client = fakeredis.FakeRedis()
    heartbeat = Heartbeat(client, 10.0, holdings=broken)
    client.sadd(held_key(consumer_id()), "kept")
    heartbeat.beat_once()  # raises nothing: the thread's loop goes on
    heartbeat.beat_once()
    assert client.exists(consumer_key(consumer_id()))
    assert client.sismember(held_key(consumer_id()), "kept")
