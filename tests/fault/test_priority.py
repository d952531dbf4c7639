"""Priority lanes on a real worker: interactive jobs go first, bulk jobs still get served."""

from __future__ import annotations

import pytest

from producer import JobStatus
from tests.conftest import BOTH_BROKERS, start_worker
from tests.fault.test_batches import FAULT_APP, _submit_behind_a_busy_worker

pytestmark = [pytest.mark.slow, BOTH_BROKERS]


def test_an_interactive_job_behind_eight_bulk_jobs_finishes_before_the_last_of_them(
    worker_env, tmp_path, make_client, figures
):
    worker = start_worker(FAULT_APP, tmp_path / "priority.log", {**worker_env, "BATCH_MAX": "1"}, name="priority")
    client = make_client()
    try:
        _, bulk = _submit_behind_a_busy_worker(client, [f"第{i}条 批量" for i in range(8)], max_new_tokens=4,
                                               priority="bulk")
        interactive = client.submit("我在等你", max_new_tokens=4)
        records = {job_id: client.wait(job_id, timeout=120) for job_id in [*bulk, interactive]}
    finally:
        worker.stop()
    order = sorted(records, key=lambda job_id: records[job_id].finished_at)
    figures.update(bulk=len(bulk), interactive_finished_as=order.index(interactive) + 1)
    assert all(record.status is JobStatus.SUCCEEDED for record in records.values())
    assert records[interactive].request.priority == "interactive"
    assert order.index(interactive) == 0  # served first, ahead of every bulk job that waited
    assert {records[job_id].request.priority for job_id in bulk} == {"bulk"}
