"""Redis restarted, down at worker start, or password-protected."""

from __future__ import annotations

import datetime
import time

import pytest
from celery import Celery

from producer import BrokerUnavailable, Client
from jobqueue.protocol import JobStatus
from jobqueue.settings import QueueSettings
from tests.conftest import start_worker
from tests.fault.conftest import PrivateRedis

pytestmark = pytest.mark.slow

JOBS = 100


def client_for(url: str) -> Client:
    return Client(settings=QueueSettings(redis_url=url))


def test_redis_restart_loses_no_queued_job(private_redis, worker_env, tmp_path, figures):
    worker = start_worker("worker.app", tmp_path / "worker.log", {**worker_env, "REDIS_URL": private_redis.url},
                          name="restart")
    client = client_for(private_redis.url)
    try:
        jobs = [client.submit(f"第{i}条 好吃", max_new_tokens=4) for i in range(JOBS)]
        waiting = client.queue_depth()
        private_redis.kill()  # a crash: only the append-only file survives
        time.sleep(1.0)
        private_redis.start()
        finals = [client.wait(job_id, timeout=180) for job_id in jobs]
    finally:
        worker.stop()
        client.close()
    succeeded = sum(record.status is JobStatus.SUCCEEDED for record in finals)
    figures.update(jobs=JOBS, waiting_at_restart=waiting, restarts=1, succeeded=succeeded, lost=JOBS - succeeded)
    assert succeeded == JOBS


def test_worker_started_while_redis_is_down_serves_once_it_is_up(tmp_path, worker_env, figures):
    server = PrivateRedis(tmp_path)  # not started yet
    worker = start_worker("worker.app", tmp_path / "worker.log", {**worker_env, "REDIS_URL": server.url},
                          wait_loaded=False, name="early")
    try:
        time.sleep(3)
        assert worker.process.poll() is None, worker.log()[-2000:]  # waiting, not dead
        server.start()
        worker.wait_for_log("ready.", timeout=120)
        with client_for(server.url) as client:
            record = client.wait(client.submit("好吃", max_new_tokens=4), timeout=120)
        figures.update(jobs=1, broker_down_at_start_s=3, final=record.status.value)
        assert record.status is JobStatus.SUCCEEDED
    finally:
        worker.stop()
        server.kill()


def test_producer_says_broker_unreachable_instead_of_hanging(private_redis, figures):
    client = client_for(private_redis.url)
    private_redis.kill()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="broker unreachable at 127.0.0.1:"):
        client.submit("好吃")
    elapsed = time.monotonic() - started
    client.close()
    figures.update(submit_error_after_s=round(elapsed, 2))
    assert elapsed < 10


def test_password_in_redis_url_works(tmp_path, worker_env, figures):
    server = PrivateRedis(tmp_path, password="s3cret-pw")
    server.start()
    worker = start_worker("worker.app", tmp_path / "worker.log", {**worker_env, "REDIS_URL": server.url}, name="auth")
    try:
        with client_for(server.url) as client:
            assert client.wait(client.submit("好吃", max_new_tokens=4), timeout=60).status is JobStatus.SUCCEEDED
        wrong = server.url.replace("s3cret-pw", "wrong")
        with client_for(wrong) as client, pytest.raises(BrokerUnavailable) as err:
            client.submit("好吃")
        assert "s3cret-pw" not in str(err.value) and "wrong" not in str(err.value)
        assert "s3cret-pw" not in worker.log()
        figures.update(jobs=1, auth="requirepass")
    finally:
        worker.stop()
        server.kill()


def test_jobs_taken_for_a_batch_survive_redis_going_away(private_redis, figures):
    # A batch took two jobs; Redis died before they could be handed back. Once Redis
    # is back, the next take hands them back first: nothing waits for VISIBILITY_TIMEOUT_S.
    from jobqueue.protocol import TASK_NAME, new_job_id
    from worker.app import celery_config
    from jobqueue.queue.intake import Intake
    from worker.settings import WorkerSettings

    app = Celery("intake-test", set_as_current=False)
    app.conf.update(celery_config(WorkerSettings(redis_url=private_redis.url)))
    job_ids = [new_job_id() for _ in range(2)]
    for job_id in job_ids:
        app.send_task(TASK_NAME, kwargs={"message": {"request": {"text": "好吃"}}}, task_id=job_id)
    intake = Intake(app)
    try:
        taken = intake.take(5, wait_s=0)
        assert [item.job_id for item in taken] == job_ids
        private_redis.kill()
        with pytest.raises(Exception):
            taken[0].requeue()
        private_redis.start()  # the append-only file kept the queue and kombu's unacked set
        again = intake.take(5, wait_s=0)
        figures.update(jobs=len(job_ids), handed_back=len(again))
        assert sorted(item.job_id for item in again) == sorted(job_ids)
    finally:
        intake.close()
        app.close()


@pytest.mark.parametrize(("refusal", "setup"), [
    ("OOM", [("CONFIG", "SET", "maxmemory-policy", "noeviction"), ("CONFIG", "SET", "maxmemory", "1")]),
    ("READONLY", [("REPLICAOF", "127.0.0.1", "1")]),  # a replica (of nothing) refuses writes
])
def test_redis_refusing_writes_is_a_503_with_retry_after_and_writes_nothing(private_redis, refusal, setup):
    import redis
    from fastapi.testclient import TestClient

    from producer.api import create_app
    from producer.settings import ApiSettings

    # The gateway in process; the private Redis is made to refuse writes (it is reconfigured).
    admin = redis.Redis.from_url(private_redis.url)
    for command in setup:
        admin.execute_command(*command)
    settings = QueueSettings(redis_url=private_redis.url)
    with Client(settings=settings) as client:
        with pytest.raises(BrokerUnavailable, match=f"refuses writes: {refusal}"):
            client.submit("好吃")
    with TestClient(create_app(ApiSettings(redis_url=private_redis.url))) as gateway:
        response = gateway.post("/v1/jobs", json={"text": "好吃"})
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.json()["code"] == "broker_unavailable" and refusal in response.json()["message"]
    assert admin.keys("qwen-allinone:*") == []


def test_redis_full_for_five_seconds_while_jobs_and_turns_run_loses_nothing(private_redis, worker_env, tmp_path,
                                                                           figures):
    import threading

    import redis

    admin = redis.Redis.from_url(private_redis.url)
    worker = start_worker("tests.support.fault_app", tmp_path / "full.log",
                          {**worker_env, "REDIS_URL": private_redis.url}, name="full")
    client = client_for(private_redis.url)
    accepted: list[str] = []
    refused: list[str] = []
    stop = threading.Event()

    def submit_stream():
        turn = 0
        while not stop.is_set():
            turn += 1
            try:  # plain jobs and the turns of one conversation, side by side
                accepted.append(client.submit(f"[[slow=0.02]] 第{turn}单 太慢了", max_new_tokens=8))
                accepted.append(client.submit(f"第{turn}句", conversation_id="full-chat", max_new_tokens=8))
            except BrokerUnavailable as err:
                refused.append(str(err))
            time.sleep(0.1)

    submitter = threading.Thread(target=submit_stream)
    try:
        submitter.start()
        time.sleep(2)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # full: every write is refused with OOM
        full_from = datetime.datetime.now()
        time.sleep(5)
        admin.config_set("maxmemory", 0)
        full_until = datetime.datetime.now()
        time.sleep(1)
        stop.set()
        submitter.join()
        finals = [client.wait(job_id, timeout=120) for job_id in accepted]
    finally:
        stop.set()
        worker.stop()
    handed_back = worker.log().count("before handing it back to the queue")
    # Celery's deliveries (redeliveries included) while Redis was full.
    deliveries = sum(full_from <= _logged_at(line) <= full_until
                     for line in worker.log().splitlines() if line.endswith("] received"))
    figures.update(accepted=len(accepted), refused_503=len(refused), handed_back_while_full=handed_back,
                   deliveries=deliveries, lost=sum(r.status is not JobStatus.SUCCEEDED for r in finals))
    assert refused and all("refuses writes: OOM" in message for message in refused)
    assert all(r.status is JobStatus.SUCCEEDED for r in finals), [r.status for r in finals]
    # Backing off 0.5, 1, 2, 4 s until Redis takes writes: a handful of tries and deliveries in
    # 5 s, not a redelivery loop.
    assert handed_back <= 8, handed_back
    assert deliveries <= 8, deliveries


def _logged_at(line: str) -> datetime.datetime:
    """The time of a Celery log line: ``[2026-12-02 21:47:03,083: INFO/...] ...``."""
    return datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")


def test_a_refusing_redis_never_stops_celerys_consumer(private_redis):
    """An ack, a hand-back or a delivery that Redis refuses (OOM) is settled later, not raised."""
    import redis
    from kombu import Connection

    from jobqueue.queue import QUEUE_TRANSPORT, transport_options
    from jobqueue.queue.transport import NotRecorded

    admin = redis.Redis.from_url(private_redis.url)
    with Connection(private_redis.url, transport=QUEUE_TRANSPORT,
                    transport_options=transport_options(3600)) as connection:
        channel = connection.default_channel
        producer = connection.Producer(channel)
        for n in range(3):
            producer.publish({"n": n}, routing_key="refusals", declare=[connection.SimpleQueue("refusals").queue])
        acked, requeued = (channel.basic_get("refusals", no_ack=False) for _ in range(2))
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            acked.ack()  # refused in Redis: done in memory, no exception
            requeued.reject(requeue=True)
            assert admin.hlen("unacked") == 2  # both records kept: nothing is lost meanwhile
            with pytest.raises(NotRecorded):
                channel.qos.append(channel.Message({"body": "", "properties": {"delivery_tag": "x",
                                   "delivery_info": {"exchange": "", "routing_key": "refusals"}}},
                                   channel=channel), "x")
        finally:
            admin.config_set("maxmemory", 0)
        third = channel.basic_get("refusals", no_ack=False)  # the next step settles the leftovers
        assert admin.hlen("unacked") == 1 and admin.hexists("unacked", third.delivery_tag)
        assert admin.llen("refusals") == 1  # the rejected one is back in the queue
