"""The place-in-line index: a job's ``queue_position`` in O(log N), however long the queue.

kombu keeps the queue as Redis lists, one per priority lane: a message joins at
the left (LPUSH) and is taken from the right (BRPOP, RPOP). Finding one job's place
meant reading every message. Beside the lists, ``LINE_KEY`` is a sorted set of the
waiting jobs' ids scored by their place: lane ``i``'s jobs score within
``i × LINE_LANE_SPAN ± LINE_LANE_SPAN / 2`` (lanes are served in that order), and
within a lane by a sequence number (``LINE_SEQ_KEY``) that counts up for a message
queued at the end and down for one handed back to the front. ZRANK + 1 is then the
place in line, and every write below is O(log N).

Every path that moves a job message keeps the index in the same step:

- into a lane: admission (``submission``), a plain publish (a re-send, Celery's retry)
  and kombu's hand-backs (``transport.Channel``), the reconciler's hand-back and its
  promotion of overdue bulk jobs (``reconciler``), all through ``PUSH_LUA``;
- out of a lane: a delivery to Celery's consumer (``transport.QoS.append``), a take for a
  batch (``intake``), a cancel (``JobStore.cancel``), and a record marked running
  (``JobStore.put``).

What it cannot see: a message pushed by something else (not ours, or poison) is not
counted, and a job popped by a process killed before it recorded the delivery keeps its
entry until its re-send (at the back) or its final record (then ``prune`` drops it). So
``queue_position`` is exact but for those moments, off by the messages concerned.
"""

from __future__ import annotations

import redis

from jobqueue.protocol import LINE_KEY, LINE_LANE_SPAN, LINE_SEQ_KEY, OPEN_JOBS_KEY

#: Lua: ``line_push(lane_key, lane_index, payload, job_id, front)`` pushes ``payload`` to the back
#: (LPUSH) or the front (RPUSH) of ``lane_key`` and scores ``job_id`` in the line to match. Scripts
#: that use it take LINE_KEY and LINE_SEQ_KEY as ``line_keys`` (set before the call). Scores are
#: written with '%d': Lua would print a large number with 14 digits and round it.
PUSH_LUA = f"""
local line_keys = {{}}
local function line_push(lane_key, lane_index, payload, job_id, front)
  if front then redis.call('RPUSH', lane_key, payload) else redis.call('LPUSH', lane_key, payload) end
  if job_id and job_id ~= '' then
    local field = (front and 'front:' or 'back:') .. lane_index
    local seq = redis.call('HINCRBY', line_keys[2], field, front and -1 or 1)
    redis.call('ZADD', line_keys[1], string.format('%d', tonumber(lane_index) * {LINE_LANE_SPAN} + seq), job_id)
  end
end
"""

#: One push. KEYS: the lane, LINE_KEY, LINE_SEQ_KEY. ARGV: lane index, payload, job id, '1' for the front.
_PUSH_SCRIPT = PUSH_LUA + """
line_keys = {KEYS[2], KEYS[3]}
line_push(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1')
return 1
"""


def push(client, lane: str, lane_index: int, payload: str, job_id: str | None, *, front: bool) -> None:
    """Push one message to its lane's back (or ``front``) with its place in line; ``client`` may be
    a transaction's pipeline."""
    client.eval(_PUSH_SCRIPT, 3, lane, LINE_KEY, LINE_SEQ_KEY, lane_index, payload, job_id or "",
                "1" if front else "0")


def positions(client: redis.Redis, job_ids: list[str]) -> dict[str, int]:
    """Each waiting job's place in line (1 = next); a job in no lane is left out. One ZRANK each."""
    if not job_ids:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.zrank(LINE_KEY, job_id)
        ranks = pipe.execute()
    return {job_id: rank + 1 for job_id, rank in zip(job_ids, ranks) if rank is not None}


#: How many entries of the line one ``prune`` looks at.
PRUNE_BATCH = 500


def prune(client: redis.Redis, cursor: int) -> int:
    """Drop up to PRUNE_BATCH entries from rank ``cursor`` on whose jobs are no longer open (final, or
    their record gone): left by a process killed between taking a message and recording it. Returns
    the cursor for the next call (0: start again). Two commands of PRUNE_BATCH ids each."""
    ids = [raw.decode() for raw in client.zrange(LINE_KEY, cursor, cursor + PRUNE_BATCH - 1)]
    if not ids:
        return 0
    scores = client.zmscore(OPEN_JOBS_KEY, ids)
    closed = [job_id for job_id, score in zip(ids, scores) if score is None]
    if closed:
        client.zrem(LINE_KEY, *closed)
    return 0 if len(ids) < PRUNE_BATCH else cursor + len(ids) - len(closed)
