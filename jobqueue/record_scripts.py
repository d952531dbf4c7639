"""Lua pieces that write a new job's record, shared by the scripts that must write it in the same
step as something else: the Redis submit (``queue/submission.py``: with the message and its place in
line) and the RabbitMQ submit (``queue/amqp.py``: with the unsent mark). One copy, so a new piece
of a new record's bookkeeping is added once.

- ``claimed_answer(claim, digest)``: nil when the idempotency claim (key, or '') is free; else the
  script's answer: ``{2, job id}`` when it names a job of the same request (digest), ``{3, job id}``
  when of another.
- ``write_new_record(record, json, ttl, open_jobs, open_score, job_id, pending, claim, digest)``:
  the record, its open-job entry, its pending turn (key, or '') and the claim (key, or ''), all with
  the record's TTL.
"""

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
"""
