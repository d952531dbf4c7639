"""The Lua that writes the job record: every script piece that touches its key is here.

Scripts that must write the record in the same step as something of their own (the Redis submit,
``queue/submission.py``, with the message and its place in line; the RabbitMQ submit,
``queue/amqp.py``, with the unsent mark) put ``NEW_RECORD_LUA`` in front of their own Lua and
call its functions; they never write the record's key themselves (``tests/test_record_owner.py``).

``NEW_RECORD_LUA`` defines:

- ``claimed_answer(claim, digest)``: nil when the idempotency claim (key, or '') is free; else the
  script's answer: ``{2, job id}`` when it names a job of the same request (digest), ``{3, job id}``
  when of another.
- ``write_new_record(record, json, ttl, open_jobs, open_score, job_id, pending, claim, digest)``:
  the record, its open-job entry, its pending turn (key, or '') and the claim (key, or ''), all with
  the record's TTL.
- ``take_back_new_record(record, json, open_jobs, job_id, pending, claim)``: undo that write when
  the message was refused: the record only if it is still the one written (nothing ran it), the
  claim only if it names this job.

The keys of those calls, in that order, are ``writes.new_record_keys``.
"""

from __future__ import annotations

from jobqueue.protocol import DEFAULT_CALLBACK_MAX_PENDING, JobStatus

NEW_RECORD_LUA = """
local function claimed_answer(claim, digest)
  if claim == '' then return nil end
  local held = redis.call('GET', claim)
  if not held then return nil end
  local claimed, claimed_digest = string.match(held, '^(%S+) (%S+)$')
  if claimed_digest == digest then return {2, claimed} end
  return {3, claimed or ''}
end

local function write_new_record(record, json, ttl, open_jobs, open_score, job_id, pending, claim, digest)
  if claim ~= '' then redis.call('SET', claim, job_id .. ' ' .. digest, 'EX', ttl) end
  redis.call('SET', record, json, 'EX', ttl)
  redis.call('ZADD', open_jobs, open_score, job_id)
  if pending ~= '' then
    redis.call('RPUSH', pending, job_id)
    redis.call('EXPIRE', pending, ttl)
  end
end

local function take_back_new_record(record, json, open_jobs, job_id, pending, claim)
  if redis.call('GET', record) == json then redis.call('DEL', record) end
  redis.call('ZREM', open_jobs, job_id)
  if pending ~= '' then redis.call('LREM', pending, 0, job_id) end
  if claim ~= '' and string.match(redis.call('GET', claim) or '', '^(%S+) ') == job_id then
    redis.call('DEL', claim)
  end
end
"""

#: A final record and all its bookkeeping, in one atomic step: the record (unless the stored
#: one is already final: the first final status wins), the done signal that wakes waiting
#: clients, the job's removal from the open jobs and from its conversation's pending turns,
#: and the metrics, counted once per job (the ``counted`` mark). Redis refuses a script under
#: maxmemory at its first write, so it runs whole or not at all.
#: The job's cancel flag goes too, it joins the recently finished jobs (the service rate), and a
#: job with a callback_url joins the callbacks due (not one its client cancelled, unless it asked),
#: while its host and its tenant each have fewer pending than the gateway's caps (then it returns 2).
#: A writer that names its run (``runner``: its consumer id) is refused once the job's run passed
#: to another process (its claim, ``runner:<job_id>``, names that process): a worker cut off for
#: longer than LIVENESS_TTL_S, whose jobs another worker took over, cannot write over their run.
#: KEYS: job, done, open index, pending turns (or ""), counted mark, jobs by status, cancel flag,
#: recently finished, callbacks due, unsent jobs, the run's claim (or ""), callbacks pending,
#: their caps, callback attempts, jobs by tenant and status, stage hashes.
#: ARGV: record JSON, record TTL, done TTL, job id, status, finish time, rate window, the
#: callback's owner ("<host:port>\n<tenant>", or "" for none), ran ('1' or '0': only jobs that ran count towards the service rate),
#: the writer's runner id (or ""), the job's tenant (or ""), then (bucket field, seconds) per stage.
FINAL_SCRIPT = "local FINAL = {" + ", ".join(f"['{s.value}'] = true" for s in JobStatus if s.is_final) + f"""}}
local DEFAULT_CAP, result = {DEFAULT_CALLBACK_MAX_PENDING}, 1
if KEYS[11] ~= '' then
  local runner = redis.call('GET', KEYS[11])
  if runner and runner ~= ARGV[10] then return 0 end
end
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, old = pcall(cjson.decode, stored)
  if ok and type(old) == 'table' and FINAL[old['status']] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('RPUSH', KEYS[2], 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[4])
if KEYS[4] ~= '' then redis.call('LREM', KEYS[4], 0, ARGV[4]) end
redis.call('DEL', KEYS[7])
redis.call('ZREM', KEYS[10], ARGV[4])
if redis.call('SET', KEYS[5], 1, 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[6], ARGV[5], 1)
  if ARGV[9] == '1' then
    redis.call('ZADD', KEYS[8], ARGV[6], ARGV[4])
    redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', ARGV[6] - ARGV[7])
  end
  if ARGV[8] ~= '' then
    local host, tenant = string.match(ARGV[8], '^([^\\n]*)\\n(.*)$')
    local caps = redis.call('HMGET', KEYS[13], 'host', 'tenant')
    local counts = redis.call('HMGET', KEYS[12], 'host:' .. host, 'tenant:' .. tenant)
    if (tonumber(counts[1]) or 0) < (tonumber(caps[1]) or DEFAULT_CAP)
        and (tonumber(counts[2]) or 0) < (tonumber(caps[2]) or DEFAULT_CAP) then
      redis.call('ZADD', KEYS[9], ARGV[6], ARGV[4])
      redis.call('HINCRBY', KEYS[12], 'host:' .. host, 1)
      redis.call('HINCRBY', KEYS[12], 'tenant:' .. tenant, 1)
      redis.call('HSET', KEYS[14], ARGV[4] .. ':owner', ARGV[8])
    else
      result = 2
    end
  end
  if ARGV[11] ~= '' then redis.call('HINCRBY', KEYS[15], ARGV[5] .. ':' .. ARGV[11], 1) end
  for i = 16, #KEYS do
    local j = 12 + (i - 16) * 2
    redis.call('HINCRBY', KEYS[i], ARGV[j], 1)
    redis.call('HINCRBY', KEYS[i], 'count', 1)
    redis.call('HINCRBYFLOAT', KEYS[i], 'sum', ARGV[j + 1])
  end
end
return result
"""

#: Every piece of Lua that may write the record's key (the dynamic check of the owner test).
OWNER_PIECES = (NEW_RECORD_LUA, FINAL_SCRIPT)
