"""Callbacks against a hostile tenant (issue #31, item 1): the gateway's sender in process, a real
Redis, and real HTTP receivers on 127.0.0.1. A receiver that drips its answer delays no other
callback; a replayed callback fails the documented receiver check; ports, internal addresses and the
allow-list are checked when sending; a cancelled job queues no callback; pending callbacks are capped
per host and per tenant."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import redis
from standardwebhooks import WebhookVerificationError

from producer.api.callbacks import CallbackSender, Ledger
from producer.client import Client
from jobqueue.callback_hosts import AllowedHosts
from jobqueue.protocol import (CALLBACK_ATTEMPTS_KEY, CALLBACK_PENDING_KEY, CALLBACKS_KEY,
                               JobRecord, JobStatus, new_job_id)
from jobqueue.settings import QueueSettings
from tests.support.receivers import Receiver

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"callback-test-secret-32-bytes!!!").decode()


@pytest.fixture
def client(lonely_redis):
    # A Redis of its own: the package's shared worker (and its reconciler) must not touch these
    # records, whose counts the tests assert exactly.
    redis.Redis.from_url(lonely_redis.url).flushdb()
    client = Client(settings=QueueSettings(redis_url=lonely_redis.url, max_queue=5000))
    yield client
    client.close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(mode: str = "ok", **kwargs) -> Receiver:
        made.append(Receiver(mode, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def finish(client: Client, url: str, tenant: str | None = None, status: JobStatus = JobStatus.SUCCEEDED,
           on_cancel: bool = False) -> str:
    """A final record with a callback, written as a worker writes it (the final-record script)."""
    job_id, now = new_job_id(), time.time()
    client.store.put(JobRecord(job_id=job_id, status=status, submitted_at=now - 1, finished_at=now, request={
        "text": "x", "callback_url": url, "tenant": tenant, "callback_on_cancel": on_cancel}))
    return job_id


@contextlib.contextmanager
def sending(client: Client, hosts: str, **kwargs):
    """A CallbackSender running on an event loop of its own thread, as in the gateway."""
    sender = CallbackSender(client, SECRET, hosts=AllowedHosts.parse(hosts), **kwargs)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> None:
        sender.start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        yield sender
    finally:
        asyncio.run_coroutine_threadsafe(sender.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_dripping_receiver_delays_no_other_callback(client, receivers, figures):
    """Six callbacks to a receiver that drips its answer for 60 s (more than the host's share of
    the slots), then one to a quick receiver: it arrives at once, and each slow attempt ends at
    its deadline (CALLBACK_TIMEOUT_S=2 here), not after the 60 s. On the sender before the fix, the
    quick one waited for the whole batch: 60.5 s."""
    slow, quick = receivers("drip", drip_for_s=60), receivers("ok")
    hosts = f"127.0.0.1:{slow.port},127.0.0.1:{quick.port}"
    with sending(client, hosts, timeout_s=2.0, max_concurrent=4) as sender:
        slow_ids = [finish(client, slow.url()) for _ in range(6)]
        assert slow.got_one.wait(5)
        time.sleep(0.3)
        lease_left = client.store.redis.zscore(CALLBACKS_KEY, slow_ids[0]) - time.time()
        ended = time.monotonic()
        finish(client, quick.url())
        assert quick.got_one.wait(10)
        delay = quick.posts[0].arrived - ended
        # The first slow attempt ends at its deadline and is counted as a failure, to retry.
        first = slow.posts[0]
        assert wait_for(lambda: client.store.redis.hget(CALLBACK_ATTEMPTS_KEY, first.headers["webhook-id"]), 5)
        first_attempt_s = time.monotonic() - first.arrived
    figures.update(quick_delay_s=round(delay, 2), slow_attempt_s=round(first_attempt_s, 1),
                   lease_left_s=round(lease_left, 1), slow_posts=len(slow.posts))
    assert delay < 2.0
    assert first_attempt_s < 2.0 + 1.5
    assert lease_left > sender.timeout_s  # the lease outlasts the attempt under way


def _receiver_check() -> str:
    """The receiver example of docs/jobs.md, as a reader would copy it."""
    text = (ROOT / "docs" / "jobs.md").read_text(encoding="utf-8")
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "Webhook(" in b]
    return block


def test_a_callback_replayed_ten_minutes_later_fails_the_receiver_check(client, receivers, monkeypatch):
    receiver = receivers("ok")
    with sending(client, f"127.0.0.1:{receiver.port}"):
        job_id = finish(client, receiver.url())
        assert receiver.got_one.wait(10)
    post = receiver.posts[0]
    namespace: dict = {}
    exec(_receiver_check(), namespace)  # noqa: S102 (the documented example, run as written)
    record = namespace["verified_record"](SECRET, post.body, post.headers)
    assert record["job_id"] == job_id and post.headers["webhook-id"] == job_id
    tampered = post.body.replace(b'"succeeded"', b'"failed"')
    with pytest.raises(WebhookVerificationError):
        namespace["verified_record"](SECRET, tampered, post.headers)

    import standardwebhooks.webhooks as library

    class TenMinutesLater(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(minutes=10)

    monkeypatch.setattr(library, "datetime", TenMinutesLater)
    with pytest.raises(WebhookVerificationError, match="too old"):
        namespace["verified_record"](SECRET, post.body, post.headers)


@pytest.mark.parametrize(("entries", "url", "allowed"), [
    ("hooks.example.com", "https://hooks.example.com/x", True),
    ("hooks.example.com", "http://hooks.example.com:80/x", True),
    ("hooks.example.com", "http://hooks.example.com:22/x", False),
    ("hooks.example.com", "https://hooks.example.com:8443/x", False),
    ("hooks.example.com:8443", "https://hooks.example.com:8443/x", True),
    ("hooks.example.com:8443", "https://hooks.example.com/x", False),
    ("127.0.0.1:9000", "http://127.0.0.1:9000/hook", True),
    ("127.0.0.1:9000", "http://127.0.0.1:9001/hook", False),
    ("[::1]:9000", "http://[::1]:9000/hook", True),
    ("127.0.0.1", "http://127.0.0.1.evil.example/x", False),
    ("hooks.example.com", "ftp://hooks.example.com/x", False),
])
def test_an_entry_without_a_port_allows_80_and_443_only(entries, url, allowed):
    assert (AllowedHosts.parse(entries).match(url) is not None) is allowed


@pytest.mark.parametrize("bad", ["hooks.example.com:0", "hooks.example.com:99999", "a b", "http://x", "x:y"])
def test_a_bad_allow_list_entry_stops_the_settings(bad):
    with pytest.raises(ValueError):
        QueueSettings(callback_allowed_hosts=bad)


def test_submit_refuses_a_port_its_entry_does_not_allow(client):
    client.settings = QueueSettings(redis_url=client.settings.redis_url, callback_allowed_hosts="127.0.0.1")
    from jobqueue.errors import InvalidRequest
    with pytest.raises(InvalidRequest, match="port 22 of '127.0.0.1' is not allowed"):
        client.submit("hi", callback_url="http://127.0.0.1:22/x")


def test_a_name_that_resolves_to_loopback_is_refused_when_sending(client, receivers, caplog, figures):
    """``localhost:<port>`` is an entry, but localhost resolves to 127.0.0.1, which is not: the
    callback is given up with a log line, never POSTed and never retried. The entry
    ``127.0.0.1:<port>`` names the address itself, so that one is sent. Before the fix, the sender
    POSTed to localhost without looking."""
    receiver = receivers("ok")
    caplog.set_level(logging.ERROR, logger="qwen_allinone.gateway")
    with sending(client, f"localhost:{receiver.port}"):
        refused = finish(client, receiver.url(host="localhost"))
        assert wait_for(lambda: client.store.redis.zscore(CALLBACKS_KEY, refused) is None, 5)
        time.sleep(0.6)
    assert receiver.posts == []
    assert client.store.redis.hlen(CALLBACK_PENDING_KEY) == 0  # its pending count went with it
    assert any(refused in line and "private, loopback or link-local" in line for line in caplog.messages)
    with sending(client, f"127.0.0.1:{receiver.port}"):
        finish(client, receiver.url())
        assert receiver.got_one.wait(10)
    figures.update(posts_to_localhost=0, posts_to_listed_address=len(receiver.posts))


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                     "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1"])
def test_internal_addresses_are_refused_unless_listed_themselves(address):
    import ipaddress

    from jobqueue.callback_hosts import parse_entry, refused_address
    assert refused_address(ipaddress.ip_address(address), parse_entry("hooks.example.com"))
    listed = parse_entry(f"[{address}]:9000" if ":" in address else f"{address}:9000")
    assert not refused_address(ipaddress.ip_address(address), listed)
    assert not refused_address(ipaddress.ip_address("93.184.216.34"), parse_entry("hooks.example.com"))


def test_the_allow_list_is_checked_again_when_sending(client, receivers, caplog):
    """A record written by a producer with a wider list of its own (or another tenant's host) is
    not sent: the gateway's lists decide where it POSTs. Before the fix, it POSTed whatever the
    record named."""
    receiver = receivers("ok")
    caplog.set_level(logging.ERROR, logger="qwen_allinone.gateway")
    tenant_hosts = {"acme": AllowedHosts.parse(f"127.0.0.1:{receiver.port}"),
                    "globex": AllowedHosts.parse("hooks.globex.example")}
    with sending(client, "hooks.example.com", tenant_hosts=tenant_hosts):
        wider = finish(client, receiver.url())  # no tenant: CALLBACK_ALLOWED_HOSTS, which lacks it
        other = finish(client, receiver.url(), tenant="globex")  # acme's receiver, globex's job
        assert wait_for(lambda: client.store.redis.zcard(CALLBACKS_KEY) == 0, 5)
        assert receiver.posts == []
        own = finish(client, receiver.url(), tenant="acme")
        assert receiver.got_one.wait(10)
    assert [post.headers["webhook-id"] for post in receiver.posts] == [own]
    given_up = " ".join(line for line in caplog.messages if "checked when sending" in line)
    assert wider in given_up and other in given_up


def test_tenants_callback_hosts_at_submit(redis_url, redis_client):
    """API_KEYS entries may carry their own hosts; a tenant's list replaces CALLBACK_ALLOWED_HOSTS."""
    from fastapi.testclient import TestClient

    from producer.api.app import create_app
    from producer.settings import ApiSettings
    settings = ApiSettings(redis_url=redis_url, callback_allowed_hosts="hooks.example.com", callback_secret=SECRET,
                           api_keys="acme=acme-key-0123456789 127.0.0.1:9000 hooks.acme.example,globex=globex-key-0123456789")
    http = TestClient(create_app(settings))  # no lifespan: nothing is sent
    acme, globex = {"X-API-Key": "acme-key-0123456789"}, {"X-API-Key": "globex-key-0123456789"}

    def submit(headers: dict, url: str) -> int:
        return http.post("/v1/jobs", json={"text": "hi", "callback_url": url}, headers=headers).status_code

    assert submit(acme, "http://127.0.0.1:9000/hook") == 202
    assert submit(acme, "https://hooks.acme.example/x") == 202
    assert submit(acme, "https://hooks.example.com/x") == 422  # its own list replaces the shared one
    assert submit(globex, "http://127.0.0.1:9000/hook") == 422
    assert submit(globex, "https://hooks.example.com/x") == 202
    assert "hooks.acme" not in http.get("/openapi.json").text


def test_jobs_their_clients_cancel_queue_no_callbacks(client, figures):
    """1,000 submit-then-cancel jobs queue no callback; one that asked for callback_on_cancel does.
    Before the fix, the same loop queued 1,000."""
    client.settings = QueueSettings(redis_url=client.settings.redis_url, callback_allowed_hosts="hooks.example.com",
                                    max_queue=5000)
    started = time.monotonic()
    for _ in range(1000):
        client.cancel(client.submit("hi", callback_url="https://hooks.example.com/x"))
    queued = client.store.redis.zcard(CALLBACKS_KEY)
    figures.update(jobs=1000, callbacks_queued=queued, seconds=round(time.monotonic() - started, 1))
    assert queued == 0
    asked = client.submit("hi", callback_url="https://hooks.example.com/x", callback_on_cancel=True)
    client.cancel(asked)
    assert client.store.redis.zrange(CALLBACKS_KEY, 0, -1) == [asked.encode()]


def test_pending_callbacks_are_capped_per_host_and_per_tenant(client, figures):
    """Caps of 5 per host and 8 per tenant: a flood to one host queues 5; the tenant's other host
    gets 3 more; another tenant is not held back; a callback done makes room for one."""
    ledger = Ledger(client.store.redis, lease_s=40, retry_for_s=600)
    ledger.publish_limits(per_host=5, per_tenant=8)
    flood = [finish(client, "https://a.example/x", tenant="mallory") for _ in range(50)]
    other_host = [finish(client, "https://b.example/x", tenant="mallory") for _ in range(50)]
    others = [finish(client, "https://c.example/x", tenant="acme") for _ in range(3)]
    pending = {raw.decode() for raw in client.store.redis.zrange(CALLBACKS_KEY, 0, -1)}
    figures.update(flood=100, queued_for_flooder=len(pending & set(flood + other_host)),
                   queued_for_other_tenant=len(pending & set(others)))
    assert len(pending & set(flood)) == 5 and len(pending & set(other_host)) == 3
    assert pending & set(others) == set(others)
    ledger.forget(next(iter(pending & set(flood))))
    assert client.store.redis.hget(CALLBACK_PENDING_KEY, "tenant:mallory") == b"7"
    late = finish(client, "https://a.example/x", tenant="mallory")
    assert client.store.redis.zscore(CALLBACKS_KEY, late) is not None
