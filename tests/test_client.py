"""The producer client against fakeredis: validation, admission control, reading, waiting."""

from __future__ import annotations

import base64
import json
import threading
import time

import fakeredis
import pytest

from producer import BrokerUnavailable, Client, InvalidRequest, JobNotFound, JobStatus, QueueFull, WaitTimeout
from jobqueue.queue import CELERY_WIRE_CONFIG
from jobqueue.protocol import (
    LINE_KEY,
    LINE_SEQ_KEY,
    OPEN_JOBS_KEY,
    QUEUE_NAME,
    JobRecord,
    done_key,
    job_key,
    new_job_id,
    pending_turns_key,
)
from jobqueue.settings import QueueSettings


@pytest.fixture
def fake():
    return fakeredis.FakeRedis()


@pytest.fixture
def client(fake):
    # The broker URL is never contacted in these tests: they stop before sending.
    settings = QueueSettings(redis_url="redis://127.0.0.1:1/0", max_queue=3, max_input_chars=20)
    with Client(settings=settings, redis_client=fake) as c:
        yield c


@pytest.mark.parametrize(
    ("kwargs", "field", "limit"),
    [
        ({"text": ""}, "text", "non-whitespace"),
        ({"text": "x" * 21}, "text", "at most 20 characters"),
        ({"text": "ok", "max_new_tokens": 0}, "options.max_new_tokens", "greater than or equal to 1"),
        ({"text": "ok", "temperature": 5.0}, "options.temperature", "less than or equal to 2"),
        ({"text": "ok", "labels": "fr"}, "options.labels", "'zh', 'en', 'zh3' or 'en3'"),
        ({"text": "ok", "conversation_id": "a b"}, "conversation_id", "pattern"),
        ({"text": "ok", "priority": "urgent"}, "priority", "'interactive' or 'bulk'"),
    ],
)
def test_bad_input_names_field_and_limit_and_writes_nothing(client, fake, kwargs, field, limit):
    text = kwargs.pop("text")
    with pytest.raises(InvalidRequest) as err:
        client.submit(text, **kwargs)
    assert str(err.value).startswith(f"{field}: ")
    assert limit in str(err.value)
    assert fake.keys("*") == []


@pytest.fixture
def queue_keys(redis_client):
    """The real Redis's queue (every lane: earlier tests leave bulk jobs when no worker runs) and
    open-job index, emptied before and after (db 15, the suite's own)."""
    from jobqueue.queue.transport import lane_keys

    keys = [*lane_keys(QUEUE_NAME), OPEN_JOBS_KEY, LINE_KEY, LINE_SEQ_KEY]
    redis_client.delete(*keys)
    yield redis_client
    redis_client.delete(*keys)


def _keys_but_done_signals(client) -> set[bytes]:
    # A finished job's done signal is popped and pushed back by whoever waits on it (Client.wait),
    # so it can vanish and reappear while this test looks: the CI saw one from an earlier test's job.
    return {key for key in client.keys("qwen-allinone*") if not key.startswith(done_key("").encode())}


def test_queue_full_is_refused_and_writes_nothing(make_client, queue_keys):
    queue_keys.rpush(QUEUE_NAME, "m1", "m2", "m3")
    before = _keys_but_done_signals(queue_keys)
    with pytest.raises(QueueFull, match="3 jobs waiting, MAX_QUEUE=3"):
        make_client(max_queue=3).submit("hello", conversation_id="c-full")
    assert _keys_but_done_signals(queue_keys) == before  # kombu may declare its bindings, nothing else
    assert queue_keys.llen(QUEUE_NAME) == 3


def test_a_job_is_queued_whole_with_its_record_open_job_and_turn(make_client, queue_keys):
    job_id = make_client().submit("好吃", conversation_id="c-whole")
    envelope = json.loads(queue_keys.lindex(QUEUE_NAME, 0))
    assert envelope["headers"]["id"] == job_id
    assert JobRecord.from_json(queue_keys.get(job_key(job_id))).status is JobStatus.QUEUED
    assert queue_keys.zscore(OPEN_JOBS_KEY, job_id) is not None
    assert queue_keys.lrange(pending_turns_key("c-whole"), 0, -1) == [job_id.encode()]
    queue_keys.delete(pending_turns_key("c-whole"), job_key(job_id))


def test_a_queued_job_s_text_travels_as_utf_8_not_as_escapes(make_client, queue_keys):
    """A Chinese character is 3 bytes of the message, not a 6-byte \\uXXXX escape, and the text is not
    repeated in Celery's headers: this job's message is about a third of its old size in Redis."""
    text = "好吃" * 500
    job_id = make_client().submit(text)
    raw = queue_keys.lindex(QUEUE_NAME, 0)
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/json"
    assert text.encode() in base64.b64decode(envelope["body"])
    assert "好吃" not in json.dumps(envelope["headers"], ensure_ascii=False)
    assert job_id in envelope["headers"]["kwargsrepr"]
    assert len(raw) < 6_000  # 15,424 bytes before: the text escaped, and its first 1,024 characters again


def test_a_retried_publish_does_not_queue_the_job_twice(make_client, queue_keys):
    from jobqueue.queue.submission import AdmissionPlan

    job_id = make_client().submit("好吃")
    record = JobRecord.from_json(queue_keys.get(job_key(job_id)))
    # What kombu does after a connection dropped once the script had run: publish again.
    AdmissionPlan(record, max_queue=10, ttl_s=60).run(queue_keys, QUEUE_NAME, [QUEUE_NAME], "{}")
    assert queue_keys.llen(QUEUE_NAME) == 1
    queue_keys.delete(job_key(job_id))


def test_concurrent_submitters_never_overshoot_max_queue(make_client, queue_keys):
    client = make_client(max_queue=20)
    outcomes: list[str] = []

    def submit_some():
        for _ in range(10):
            try:
                client.submit("好吃")
                outcomes.append("queued")
            except QueueFull:
                outcomes.append("full")

    threads = [threading.Thread(target=submit_some) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert queue_keys.llen(QUEUE_NAME) == 20 == outcomes.count("queued")
    queue_keys.delete(*queue_keys.keys("qwen-allinone:job:*"))


def test_get_unknown_or_malformed_id_is_none(client):
    assert client.get(new_job_id()) is None
    assert client.get("not-a-job-id") is None


def _write(fake, status: JobStatus, **fields) -> JobRecord:
    record = JobRecord(job_id=new_job_id(), status=status, request={"text": "hi"}, submitted_at=time.time(), **fields)
    fake.set(job_key(record.job_id), record.to_json())
    return record


def test_get_returns_the_stored_record(client, fake):
    record = _write(fake, JobStatus.RUNNING)
    assert client.get(record.job_id) == record


def test_wait_unknown_job_raises_not_found(client):
    with pytest.raises(JobNotFound, match="not found"):
        client.wait(new_job_id(), timeout=1)


def test_wait_times_out_with_the_current_status(client, fake):
    record = _write(fake, JobStatus.QUEUED)
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="still queued after waiting 0.3s"):
        client.wait(record.job_id, timeout=0.3, poll_interval=0.05)
    assert time.monotonic() - started < 2


def test_watch_yields_each_change_until_final(client, fake):
    record = _write(fake, JobStatus.QUEUED)

    def progress():
        for status in (JobStatus.RUNNING, JobStatus.SUCCEEDED):
            time.sleep(0.2)
            fake.set(job_key(record.job_id), record.model_copy(update={"status": status}).to_json())

    thread = threading.Thread(target=progress)
    thread.start()
    seen = [r.status for r in client.watch(record.job_id, timeout=5, poll_interval=0.02)]
    thread.join()
    assert seen == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED]


def test_unreachable_broker_is_a_clear_error_not_a_hang():
    settings = QueueSettings(redis_url="redis://127.0.0.1:1/0")
    with Client(settings=settings) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="broker unreachable at 127.0.0.1:1"):
            client.submit("hello")
        with pytest.raises(BrokerUnavailable):
            client.get(new_job_id())
    assert time.monotonic() - started < 10


def test_password_is_not_printed_in_errors():
    with Client(settings=QueueSettings(redis_url="redis://:s3cret@127.0.0.1:1/0")) as client:
        with pytest.raises(BrokerUnavailable) as err:
            client.submit("hello")
    assert "s3cret" not in str(err.value)


def test_unreadable_record_is_a_clear_error(client, fake):
    from jobqueue.errors import UnreadableRecord

    job_id = new_job_id()
    fake.set(job_key(job_id), '{"job_id": "x", "status": "from-the-future"}')
    with pytest.raises(UnreadableRecord, match=f"record of job {job_id} is unreadable"):
        client.get(job_id)


def test_wait_wakes_on_the_final_write_without_polling(redis_url, redis_client):
    """The store's final write signals the waiting client at once; it never re-reads on a timer in between."""
    from jobqueue.store import JobStore

    store = JobStore(redis_client, ttl_s=60)
    record = JobRecord(job_id=new_job_id(), status=JobStatus.RUNNING, request={"text": "hi"},
                       submitted_at=time.time())
    store.put(record)
    final = record.model_copy(update={"status": JobStatus.SUCCEEDED, "reply": "好的"})
    waiters, results = [], []
    with Client(settings=QueueSettings(redis_url=redis_url)) as client:
        for _ in range(2):  # two clients waiting on one job both wake
            waiters.append(threading.Thread(
                target=lambda: results.append(client.wait(record.job_id, timeout=20, poll_interval=30))))
            waiters[-1].start()
        time.sleep(0.3)
        written = time.monotonic()
        store.put(final)
        for waiter in waiters:
            waiter.join(10)
        woke_after = time.monotonic() - written
    assert [r.status for r in results] == [JobStatus.SUCCEEDED] * 2
    assert woke_after < 2  # with poll_interval=30 only the signal can have woken them


def test_other_redis_errors_are_not_disguised_as_an_outage(make_client, queue_keys):
    import redis

    queue_keys.set(QUEUE_NAME, "not a list")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        make_client().submit("好吃")


def test_the_bulk_lane_has_its_own_limit_and_interactive_jobs_still_get_in(make_client, queue_keys):
    from jobqueue.queue.transport import lane_keys

    bulk_lane = lane_keys(QUEUE_NAME)[-1]
    queue_keys.delete(bulk_lane)
    try:
        client = make_client(max_queue=10, max_queue_bulk=2)
        for _ in range(2):
            client.submit("批量", priority="bulk")
        with pytest.raises(QueueFull, match="2 bulk jobs waiting, MAX_QUEUE_BULK=2"):
            client.submit("批量", priority="bulk")
        client.submit("在线")
        assert queue_keys.llen(bulk_lane) == 2 and queue_keys.llen(QUEUE_NAME) == 1
        assert client.queue_depth() == 3  # both lanes count
    finally:
        queue_keys.delete(bulk_lane)


def test_a_waiting_job_knows_its_place_in_line_and_when_it_starts(make_client, queue_keys):
    from jobqueue.protocol import FINISHED_RECENTLY_KEY
    from jobqueue.queue.transport import lane_keys

    bulk_lane = lane_keys(QUEUE_NAME)[-1]
    queue_keys.delete(bulk_lane, FINISHED_RECENTLY_KEY)
    try:
        client = make_client()
        bulk = client.submit("批量", priority="bulk")
        first, second = client.submit("一"), client.submit("二")
        assert [client.get(j).queue_position for j in (first, second, bulk)] == [1, 2, 3]  # bulk last
        assert client.get(first).eta_s is None  # no job finished lately: no rate to go by
        now = time.time()
        queue_keys.zadd(FINISHED_RECENTLY_KEY, {f"done-{i}": now - i for i in range(30)})  # 30 in 300 s
        assert client.get(second).eta_s == 20.0  # 2nd in line at 0.1 jobs/s
        taken = _take_one(client)  # a worker took the first
        assert taken.job_id == first and client.get(second).queue_position == 1
        assert client.get(bulk).queue_position == 2
        taken.ack()
    finally:
        queue_keys.delete(bulk_lane, FINISHED_RECENTLY_KEY)


def _take_one(client):
    """Take the next job as a worker's batch does (jobqueue.queue.intake), which leaves the line."""
    from celery import Celery

    from jobqueue.queue import QUEUE_TRANSPORT
    from jobqueue.queue.intake import Intake

    app = Celery("take-one", set_as_current=False)
    app.conf.update(CELERY_WIRE_CONFIG, broker_url=client.settings.redis_url, broker_transport=QUEUE_TRANSPORT)
    (taken,) = Intake(app).take(1, 0)
    return taken


def test_jobs_that_never_ran_do_not_count_towards_the_service_rate(make_client, queue_keys):
    from jobqueue.protocol import FINISHED_RECENTLY_KEY

    queue_keys.delete(FINISHED_RECENTLY_KEY)
    client = make_client()
    client.cancel(client.submit("不要了"))  # final, but it never ran
    assert queue_keys.zcard(FINISHED_RECENTLY_KEY) == 0
    assert client.store.service_rate(time.time()) is None


def test_a_cancelled_queued_job_leaves_the_queue_and_frees_its_place(make_client, queue_keys):
    client = make_client(max_queue=2)
    first, second = client.submit("一"), client.submit("二")
    with pytest.raises(QueueFull):
        client.submit("三")
    assert client.cancel(first).status is JobStatus.CANCELLED
    assert client.queue_depth() == 1 and client.get(second).queue_position == 1  # it moved up
    client.submit("三")  # the cancelled job's place is free
    assert client.queue_depth() == 2


def test_reading_a_waiting_job_is_one_round_trip_to_redis(make_client, queue_keys):
    """A client's read of one job (record, place and ETA) waits for Redis once: under a deep queue's
    polling clients, each further wait is another turn for the connection and the GIL (#30)."""
    client = make_client()
    job_id = client.submit("一")
    commands = []
    connection_pool = client.store.redis.connection_pool
    real_get_connection = connection_pool.get_connection

    def counting_get_connection(*args, **kwargs):
        commands.append(args)
        return real_get_connection(*args, **kwargs)

    connection_pool.get_connection = counting_get_connection
    try:
        record = client.get(job_id)
    finally:
        connection_pool.get_connection = real_get_connection
    assert record.queue_position is not None and len(commands) == 1
