"""Far more submissions than one worker can serve: the excess is refused, never lost or half-written."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from producer import QueueFull
from jobqueue.protocol import JobRecord, JobStatus
from tests.conftest import start_worker

pytestmark = pytest.mark.slow

SUBMISSIONS = 2000
THREADS = 32
MAX_QUEUE = 200


def test_overload_refuses_the_excess_and_completes_the_rest(worker_env, tmp_path, make_client, redis_client, figures):
    worker = start_worker("worker.app", tmp_path / "worker.log", worker_env, name="overload")
    try:
        client = make_client(max_queue=MAX_QUEUE)
        client.wait(client.submit("热身", max_new_tokens=4), timeout=60)
        rss_after_first_job = worker.pool_rss_bytes()

        marker = uuid.uuid4().hex[:8]
        accepted: list[str] = []
        rejected = errors = 0
        lock = threading.Lock()

        def submit(i: int) -> None:
            nonlocal rejected, errors
            try:
                job_id = client.submit(f"{marker} 第{i}单 送餐太慢了", max_new_tokens=4)
            except QueueFull:
                with lock:
                    rejected += 1
                return
            except Exception:
                with lock:
                    errors += 1
                raise
            with lock:
                accepted.append(job_id)

        depths = [0]
        done = threading.Event()

        def sample_depth() -> None:
            while not done.is_set():
                depths.append(client.queue_depth())
                done.wait(0.005)

        sampler = threading.Thread(target=sample_depth)
        sampler.start()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(submit, range(SUBMISSIONS)))
        done.set()
        sampler.join()
        finals = [client.wait(job_id, timeout=600, poll_interval=0.5) for job_id in accepted]
        rss_at_end = worker.pool_rss_bytes()
    finally:
        worker.stop()

    # Every record this test created is whole JSON, and only accepted jobs have one.
    ours = []
    for key in redis_client.scan_iter("qwen-allinone:job:*", count=1000):
        record = JobRecord.from_json(redis_client.get(key))
        if record.request is not None and record.request.text.startswith(marker):
            ours.append(record.job_id)
    growth = (rss_at_end - rss_after_first_job) / rss_after_first_job
    figures.update(submissions=SUBMISSIONS, threads=THREADS, max_queue=MAX_QUEUE, accepted=len(accepted),
                   rejected=rejected, max_depth_seen=max(depths), lost=sum(r.status is not JobStatus.SUCCEEDED for r in finals),
                   rss_first_job_mb=round(rss_after_first_job / 2**20), rss_end_mb=round(rss_at_end / 2**20),
                   rss_growth_pct=round(100 * growth, 2))
    assert errors == 0
    assert len(accepted) + rejected == SUBMISSIONS and rejected > 0
    assert all(record.status is JobStatus.SUCCEEDED for record in finals)
    assert sorted(ours) == sorted(accepted)
    # Check-then-send may overshoot by at most one message per concurrent submitter.
    assert max(depths) <= MAX_QUEUE + THREADS
    assert abs(growth) <= 0.05
