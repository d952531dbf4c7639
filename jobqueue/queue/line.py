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
  batch (``intake``), a cancel (``drop``, from ``jobqueue.cancel``), and a record marked running
  (``jobqueue.record.writes.put``).

What it cannot see: a message pushed by something else (not ours, or poison) is not
counted, and a job popped by a process killed before it recorded the delivery keeps its
entry until its re-send (at the back) or its final record (then ``prune`` drops it). So
``queue_position`` is exact but for those moments, off by the messages concerned.
"""

from __future__ import annotations

import redis

from jobqueue.protocol import LINE_KEY, LINE_LANE_SPAN, LINE_SEQ_KEY, OPEN_JOBS_KEY

#: Derived from LINE_KEY: each tenant's own line (``<LINE_KEY>:t:<tenant>``, a sorted set scored like the
#: line), each waiting job's tenant (a hash) and the tenants with jobs waiting (a sorted set, by name).
TENANT_LINE_INFIX = ":t:"
TENANT_OF_SUFFIX = ":tenant"
TENANTS_SUFFIX = ":tenants"
#: The tenant the fair intake took from last (``intake``).
TURN_SUFFIX = ":turn"


def line_tenant_key(tenant: str | None) -> str:
    """A tenant's own line: its waiting jobs' ids, scored as in LINE_KEY ("" for jobs without a tenant)."""
    return f"{LINE_KEY}{TENANT_LINE_INFIX}{tenant or ''}"

#: Lua: ``line_push(lane_key, lane_index, payload, job_id, front)`` pushes ``payload`` to the back
#: (LPUSH) or the front (RPUSH) of ``lane_key`` and scores ``job_id`` in the line to match, and in
#: its tenant's own line (``line_tenant_key``; the tenant is the message's ``tenant`` header, ""
#: for none), which counts the tenant's waiting jobs (ZCARD, O(1)) and gives the fair intake each
#: tenant's next job. ``line_leave(job_id)`` takes a job out of both (O(log N)); every path that
#: removes a job from the line goes through it. Scripts that use them take LINE_KEY and
#: LINE_SEQ_KEY as ``line_keys`` (set before the call); the tenants' keys are named after
#: LINE_KEY inside the script (one Redis, not a cluster, as everywhere here). Scores are written
#: with '%d': Lua would print a large number with 14 digits and round it.
PUSH_LUA = f"""
local line_keys = {{}}
local function line_tenant_of(payload)
  local ok, message = pcall(cjson.decode, payload)
  if ok and type(message) == 'table' and type(message['headers']) == 'table'
      and type(message['headers']['tenant']) == 'string' then return message['headers']['tenant'] end
  return ''
end
local function line_push(lane_key, lane_index, payload, job_id, front)
  if front then redis.call('RPUSH', lane_key, payload) else redis.call('LPUSH', lane_key, payload) end
  if job_id and job_id ~= '' then
    local field = (front and 'front:' or 'back:') .. lane_index
    local seq = redis.call('HINCRBY', line_keys[2], field, front and -1 or 1)
    local score = string.format('%d', tonumber(lane_index) * {LINE_LANE_SPAN} + seq)
    local tenant = line_tenant_of(payload)
    redis.call('ZADD', line_keys[1], score, job_id)
    redis.call('ZADD', line_keys[1] .. '{TENANT_LINE_INFIX}' .. tenant, score, job_id)
    redis.call('HSET', line_keys[1] .. '{TENANT_OF_SUFFIX}', job_id, tenant)
    redis.call('ZADD', line_keys[1] .. '{TENANTS_SUFFIX}', 0, tenant)
  end
end
local function line_leave(job_id)
  local removed = redis.call('ZREM', line_keys[1], job_id)
  local tenant = redis.call('HGET', line_keys[1] .. '{TENANT_OF_SUFFIX}', job_id)
  if tenant then
    redis.call('HDEL', line_keys[1] .. '{TENANT_OF_SUFFIX}', job_id)
    local own = line_keys[1] .. '{TENANT_LINE_INFIX}' .. tenant
    redis.call('ZREM', own, job_id)
    if redis.call('ZCARD', own) == 0 then redis.call('ZREM', line_keys[1] .. '{TENANTS_SUFFIX}', tenant) end
  end
  return removed
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


_LEAVE_SCRIPT = PUSH_LUA + """
line_keys = {KEYS[1], KEYS[2]}
local removed = 0
for i = 1, #ARGV do removed = removed + line_leave(ARGV[i]) end
return removed
"""


def leave(client, *job_ids: str) -> None:
    """Take jobs out of the line and their tenants' lines; ``client`` may be a transaction's pipeline."""
    if job_ids:
        client.eval(_LEAVE_SCRIPT, 2, LINE_KEY, LINE_SEQ_KEY, *job_ids)


#: Remove a queued job's message from its lane, found through its place in line: its entry's score
#: names its lane, the entries ahead of it in that lane its index from the lane's front, and the
#: message is looked for within ``DROP_WINDOW`` of there (its headers' first "id"; the body is
#: base64, and Celery writes the id before any user text). Work: O(log N) for the index, and the
#: list's own walk to that place for the removal.
#: KEYS: LINE_KEY, then the lanes, highest first. ARGV: job id, LINE_LANE_SPAN, DROP_WINDOW.
#: Returns how many were removed (0: in no lane, or not where the index says; a copy delivered
#: later is skipped, its record being final).
_DROP_MESSAGE_SCRIPT = PUSH_LUA + """
line_keys = {KEYS[1], ''}
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
line_leave(ARGV[1])
local span, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local lane = math.floor((tonumber(score) + span / 2) / span)
local lane_key = KEYS[2 + lane]
if not lane_key then return 0 end
local ahead = redis.call('ZCOUNT', KEYS[1], string.format('%d', lane * span - span / 2), '(' .. score)
local from = -(ahead + 1) - window
local to = math.min(-(ahead + 1) + window, -1)
for _, item in ipairs(redis.call('LRANGE', lane_key, from, to)) do
  if string.match(item, '"id": "([^"]*)"') == ARGV[1] then return redis.call('LREM', lane_key, -1, item) end
end
return 0
"""
#: How far from where the index places it a cancelled job's message is looked for.
DROP_WINDOW = 8


def drop(pipe, job_id: str, lanes: list[str]) -> None:
    """Take a queued job's message out of its lane (one of ``lanes``, highest first) and out of the
    line, in the caller's transaction ``pipe`` (a cancel)."""
    pipe.eval(_DROP_MESSAGE_SCRIPT, 1 + len(lanes), LINE_KEY, *lanes, job_id, LINE_LANE_SPAN, DROP_WINDOW)


def tenant_depth(client: redis.Redis, tenant: str | None) -> int:
    """How many of ``tenant``'s jobs wait in the lanes (ZCARD: O(1))."""
    return client.zcard(line_tenant_key(tenant))


def tenant_depths(client: redis.Redis) -> dict[str, int]:
    """Every tenant with jobs waiting, and how many ("" for jobs without a tenant): one ZCARD each."""
    tenants = [raw.decode() for raw in client.zrange(LINE_KEY + TENANTS_SUFFIX, 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for tenant in tenants:
            pipe.zcard(line_tenant_key(tenant))
        counts = pipe.execute()
    return {tenant: count for tenant, count in zip(tenants, counts) if count}


#: Lua: ``line_fair_pick(lanes, window)``: the next job of the fair order, taken out of its lane and
#: the line: among the tenants whose next job is in the highest lane any tenant's is, the first by
#: name after the one picked last (round robin); returns the message, or nil when fewer than two
#: tenants have jobs waiting (the lanes' own order is then the fair one) or the message is not
#: within ``window`` of where the index places it (the caller then pops as before). ``lanes``:
#: the lane keys, highest first. Work: one ZRANGE per waiting tenant, O(log N) for the place, and
#: the list's walk to that place (as a cancel's).
FAIR_PICK_LUA = f"""
local function line_fair_pick(lanes, window)
  local tenants = redis.call('ZRANGE', line_keys[1] .. '{TENANTS_SUFFIX}', 0, -1)
  if #tenants < 2 then return nil end
  local last = redis.call('GET', line_keys[1] .. '{TURN_SUFFIX}') or ''
  local best_lane, first, after = nil, nil, nil
  for _, tenant in ipairs(tenants) do
    local head = redis.call('ZRANGE', line_keys[1] .. '{TENANT_LINE_INFIX}' .. tenant, 0, 0, 'WITHSCORES')
    if head[1] then
      local lane = math.floor((tonumber(head[2]) + {LINE_LANE_SPAN // 2}) / {LINE_LANE_SPAN})
      if best_lane == nil or lane < best_lane then best_lane, first, after = lane, nil, nil end
      if lane == best_lane then
        local pick = {{tenant, head[1], head[2]}}
        if first == nil then first = pick end
        if after == nil and tenant > last then after = pick end
      end
    end
  end
  local pick = after or first
  if pick == nil then return nil end
  redis.call('SET', line_keys[1] .. '{TURN_SUFFIX}', pick[1])
  local lane_key = lanes[best_lane + 1]
  if not lane_key then return nil end
  local low = string.format('%d', best_lane * {LINE_LANE_SPAN} - {LINE_LANE_SPAN // 2})
  local ahead = redis.call('ZCOUNT', line_keys[1], low, '(' .. pick[3])
  local from = -(ahead + 1) - window
  local to = math.min(-(ahead + 1) + window, -1)
  for _, item in ipairs(redis.call('LRANGE', lane_key, from, to)) do
    if string.match(item, '"id": "([^"]*)"') == pick[2] then
      redis.call('LREM', lane_key, -1, item)
      line_leave(pick[2])
      return item
    end
  end
  return nil
end
"""


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
        leave(client, *closed)
    return 0 if len(ids) < PRUNE_BATCH else cursor + len(ids) - len(closed)
