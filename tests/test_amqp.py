"""The queue in RabbitMQ (the real server, a vhost of the run's own): admission, the bounded queue,
re-sending what a producer never published, poison messages and a broker restart."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from kombu import Connection, Exchange, Producer
from kombu.exceptions import OperationalError

from jobqueue.errors import QueueFull
from jobqueue.protocol import OPEN_JOBS_KEY, QUEUE_NAME, UNSENT_JOBS_KEY, JobStatus, job_key
from jobqueue.store import JobStore
from tests.conftest import start_worker
from tests.support.rabbitmq import delete_job_queue, queue_depth
from tests.test_worker_faults import wait_for
from jobqueue.queue import amqp
from jobqueue.queue.reconciler import Reconciler

pytestmark = pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True, scope="module")


@pytest.fixture
def empty_queue(broker_url, redis_client):
    delete_job_queue(broker_url)
    redis_client.delete(OPEN_JOBS_KEY, UNSENT_JOBS_KEY)
    yield broker_url
    delete_job_queue(broker_url)


def test_a_full_queue_refuses_the_job_and_writes_nothing(empty_queue, make_client, redis_client):
    client = make_client(max_queue=2)
    queued = [client.submit(f"第{i}单", max_new_tokens=4) for i in range(2)]
    assert client.queue_depth() == queue_depth(empty_queue) == 2  # declared by the producer, no worker yet
    with pytest.raises(QueueFull):
        client.submit("第三单")
    # Only the two accepted jobs exist: the refused one's record, open entry and mark were taken back.
    assert sorted(raw.decode() for raw in redis_client.zrange(OPEN_JOBS_KEY, 0, -1)) == sorted(queued)
    assert redis_client.zcard(UNSENT_JOBS_KEY) == 0
    assert queue_depth(empty_queue) == 2
    assert all(client.get(job_id).status is JobStatus.QUEUED for job_id in queued)


def test_a_job_recorded_but_never_published_is_sent_by_the_reconciler(empty_queue, make_client, redis_client,
                                                                     monkeypatch):
    client = make_client()

    def connection_lost(*args, **kwargs):
        raise OperationalError("connection lost before the publish")

    # The producer writes the record, then dies (here: loses its connection) before publishing.
    monkeypatch.setattr(amqp, "send_job", connection_lost)
    job_id = client.submit("送餐太慢了")  # the record exists, so the client reports it queued
    monkeypatch.undo()
    assert client.get(job_id).status is JobStatus.QUEUED and queue_depth(empty_queue) == 0
    assert redis_client.zscore(UNSENT_JOBS_KEY, job_id) is not None

    sweeper = Reconciler(client._celery, JobStore(redis_client, 60), amqp=client.broker, grace_s=0.3,
                         interval_s=1, max_attempts=2)
    assert sweeper.sweep().resent == []  # within its grace: the producer may still publish it
    time.sleep(0.4)
    assert sweeper.sweep().resent == [job_id]
    assert queue_depth(empty_queue) == 1 and redis_client.zscore(UNSENT_JOBS_KEY, job_id) is None
    assert sweeper.sweep().resent == []  # sent once


def test_a_job_finished_while_marked_unsent_is_not_sent_again(empty_queue, make_client, redis_client):
    client = make_client()
    job_id = client.submit("好吃")
    amqp.mark_unsent(redis_client, [job_id])
    client.cancel(job_id)  # its final record clears the mark, in the same step
    assert redis_client.zscore(UNSENT_JOBS_KEY, job_id) is None


def _publish_raw(url: str, body: bytes, headers: dict | None = None, content_type: str = "application/json"):
    """Straight into the job queue, bypassing the client (as anyone with access to RabbitMQ could)."""
    with Connection(url) as connection:
        producer = Producer(connection.channel(), exchange=Exchange(QUEUE_NAME, type="direct"),
                            routing_key=QUEUE_NAME)
        producer.publish(body, headers=headers or {}, content_type=content_type, content_encoding="utf-8",
                         serializer=None)


@pytest.mark.slow
def test_poison_messages_are_dropped_and_the_worker_keeps_serving(empty_queue, worker_env, make_client, tmp_path):
    client = make_client()
    first = client.submit("先到的一单", max_new_tokens=4)  # declares the queue
    poison = [
        (b"\xff\xfe not json at all", {}),
        (b'{"looks": "like json"}', {}),
        (json.dumps([[], {"message": None}, {}]).encode(), {"task": "someone.elses_task", "id": "x-1"}),
        (b"[1, 2", {"task": "qwen_allinone.run_job", "id": "broken-body"}),
    ]
    for body, headers in poison:
        _publish_raw(empty_queue, body, headers)
    later = [client.submit(f"后到的第{i}单", max_new_tokens=4) for i in range(3)]
    worker = start_worker("worker.app", tmp_path / "poison.log", worker_env, name="poison")
    try:
        records = [client.wait(job_id, timeout=120) for job_id in [first, *later]]
        assert all(r.status is JobStatus.SUCCEEDED for r in records), records
        assert worker.process.poll() is None
        wait_for(lambda: queue_depth(empty_queue) == 0, timeout=30)
        again = client.wait(client.submit("还能用吗", max_new_tokens=4), timeout=60)
        assert again.status is JobStatus.SUCCEEDED
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_broker_restart_with_jobs_queued_loses_nothing(empty_queue, worker_env, make_client, tmp_path, figures):
    client = make_client()
    worker = start_worker("tests.support.fault_app", tmp_path / "restart.log", worker_env, name="restart")
    try:
        jobs = [client.submit(f"[[slow=0.05]] 第{i}单 太慢了", max_new_tokens=30, temperature=0.0)
                for i in range(10)]
        wait_for(lambda: any(r.status is JobStatus.RUNNING for r in client.get_many(jobs)), timeout=60)
        waiting = queue_depth(empty_queue)
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True, timeout=120)
        records = {job_id: client.wait(job_id, timeout=240) for job_id in jobs}
        log = worker.log()
    finally:
        worker.stop()
    finals = {job_id: len(re.findall(rf"job={job_id} status=", log)) for job_id in jobs}
    figures.update(jobs=len(jobs), queued_at_restart=waiting,
                   lost=sum(r.status is not JobStatus.SUCCEEDED for r in records.values()))
    assert waiting > 0  # the restart did find jobs queued
    assert all(r.status is JobStatus.SUCCEEDED for r in records.values()), records
    assert max(finals.values()) == 1, finals  # each ran to one final record


def test_the_job_record_is_written_before_the_message(empty_queue, make_client, redis_client, monkeypatch):
    # A worker may take the message the moment it is published: the record must already be there.
    client = make_client()
    seen = {}

    def publish(celery, job_id, message, lane_priority, **options):
        seen["record"] = redis_client.get(job_key(job_id))
        seen["unsent"] = redis_client.zscore(UNSENT_JOBS_KEY, job_id)

    monkeypatch.setattr(amqp, "send_job", publish)
    job_id = client.submit("好吃")
    assert json.loads(seen["record"])["status"] == "queued" and seen["unsent"] is not None
    assert redis_client.zscore(UNSENT_JOBS_KEY, job_id) is None  # the confirm cleared it


def test_rabbitmq_down_refuses_the_job_and_writes_nothing(make_client, redis_client, redis_url):
    from jobqueue.errors import BrokerUnavailable
    from jobqueue.settings import QueueSettings

    redis_client.delete(OPEN_JOBS_KEY, UNSENT_JOBS_KEY)
    nobody = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens there
    client = make_client(broker_url=nobody)
    with pytest.raises(BrokerUnavailable, match="127.0.0.1:1"):
        client.submit("好吃")
    with pytest.raises(BrokerUnavailable):
        client.queue_depth()
    assert redis_client.zcard(OPEN_JOBS_KEY) == 0 and redis_client.zcard(UNSENT_JOBS_KEY) == 0
    assert QueueSettings(redis_url=redis_url, broker_url=nobody).broker_kind == "amqp"


def _intake(client):
    from jobqueue.queue.brokers import intake_for

    return intake_for(client._celery, client.settings, heartbeat_s=10)


def test_the_intake_takes_with_manual_acks_and_requeues_at_the_end(empty_queue, make_client):
    client = make_client()
    first, second = client.submit("第一单"), client.submit("第二单")
    intake = _intake(client)
    try:
        [taken] = intake.take(1, 1.0)
        assert taken.job_id == first and queue_depth(empty_queue) == 1  # held, not gone
        taken.requeue()  # a job that must wait goes behind the others, not back to the head
        assert [job.job_id for job in intake.take(2, 1.0)] == [second, first]
        intake.hand_back_unsettled()  # what a finished batch left unsettled goes back
        assert queue_depth(empty_queue) == 2
    finally:
        intake.close()


def test_a_settle_after_the_connection_broke_is_logged_and_the_message_comes_back(empty_queue, make_client):
    client = make_client()
    job_id = client.submit("好吃")
    intake = _intake(client)
    try:
        [taken] = intake.take(1, 1.0)
        intake._connection.release()  # the connection breaks under the running batch
        taken.ack()  # the final record is written: the batch goes on, whatever the broker says
        wait_for(lambda: queue_depth(empty_queue) == 1, timeout=10)  # RabbitMQ handed it back
        assert [job.job_id for job in intake.take(1, 1.0)] == [job_id]  # a new connection takes it
    finally:
        intake.close()


def test_a_queue_deleted_under_a_running_producer_is_declared_again_not_dropping_jobs(empty_queue, make_client):
    client = make_client()
    client.submit("第一单")  # Celery declares the queue once per connection...
    delete_job_queue(empty_queue)  # ...so once an operator deletes it, plain publishes would vanish
    second = client.submit("第二单")
    third = client.submit("第三单")
    assert queue_depth(empty_queue) == 2
    assert client.get(second).status is JobStatus.QUEUED and client.get(third).status is JobStatus.QUEUED


def test_a_quorum_queue_is_declared_bounded_and_taken_from(empty_queue, make_client, redis_client):
    from urllib.parse import urlsplit

    client = make_client(broker_quorum=True, max_queue=2)
    queued = [client.submit(f"第{i}单") for i in range(2)]
    with pytest.raises(QueueFull):  # reject-publish holds on quorum queues too
        client.submit("第三单")
    vhost = urlsplit(empty_queue).path.lstrip("/")
    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type"], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    assert re.search(rf"^{QUEUE_NAME}\s+quorum$", listed, re.M), listed
    intake = _intake(client)
    try:
        assert [job.job_id for job in intake.take(2, 1.0)] == queued
    finally:
        intake.close()
    assert redis_client.zcard(UNSENT_JOBS_KEY) == 0

