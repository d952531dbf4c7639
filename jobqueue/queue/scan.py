"""The reconciler's read of the queue: bounded work per sweep, resumed with a cursor.

To find open jobs whose message is gone, a sweep must know which jobs the queue holds. One
Lua script that read every lane held Redis for 235 ms at 1,000 queued 2,000-character jobs,
and for seconds at 10,000. A ``QueueScan`` reads at most ``budget`` messages per sweep, in
commands of ``chunk`` messages (each returns only the job ids), and goes on where it stopped at
the next sweep. A *pass* is one read of every lane; when it ends, the jobs that were open when
it began and were seen in no lane (nor, the caller checks, in an unacked record) are what it
found lost.

Why nothing is missed: each lane is read from its back (index 0, where new messages join)
towards its front (where workers take them). A push at the back moves every message one place
further from index 0, and a take from the front moves none, so a message that stays in its lane
while the pass reads it is seen (perhaps twice). Lanes are read lowest first: a bulk job promoted
to the top lane's back during the pass is seen in one of them. A message that moves otherwise
(handed back to a lane already read, or removed by a cancel ahead of the cursor) can be missed
by one pass; the reconciler acts only on what two passes ``grace_s`` apart agree on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from jobqueue.protocol import OPEN_JOBS_KEY

#: The job ids of a lane's messages from index ARGV[1] to ARGV[2] (its headers' first "id"; '' for a
#: message with none). The envelope's first field is the body, base64 without a quote, and Celery
#: writes the id before any user text: a plain find (C's memchr) skips the body to its closing
#: quote, and the pattern, slow in Lua (78 ms for 500 messages of 2,000 Chinese characters when
#: it walked the body too), starts there. KEYS: the lane.
_IDS_SCRIPT = """
local ids = {}
for _, item in ipairs(redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])) do
  local body_end = string.find(item, '", "', 1, true) or 1
  table.insert(ids, string.match(item, '"id": "([^"]*)"', body_end) or '')
end
return ids
"""
#: Messages one sweep reads at most (a pass over a queue of MAX_QUEUE=1,000 takes one sweep).
SCAN_BUDGET = 2000
#: Messages one command reads: copying messages into Lua is most of its cost, about 0.75 ms for 50
#: messages of 2,000 Chinese characters (9.5 KB each; 1.5 ms when they were 17.6 KB, their text
#: escaped and repeated in Celery's headers) on an AMD EPYC with AVX-512.
SCAN_CHUNK = 50
#: Open jobs' ids one ZSCAN step asks for.
OPEN_CHUNK = 200


@dataclass
class _Pass:
    #: The jobs open when the pass began: the only ones it can say are lost.
    wanted: set[str]
    lane: int = 0
    index: int = 0
    seen: set[str] = field(default_factory=set)


class QueueScan:
    def __init__(self, lanes: list[str], *, budget: int = SCAN_BUDGET, chunk: int = SCAN_CHUNK):
        #: Lowest priority first (see the module's docstring).
        self.lanes = list(reversed(lanes))
        self.budget = budget
        self.chunk = chunk
        self._pass: _Pass | None = None

    def step(self, client: redis.Redis) -> list[str] | None:
        """Read on; None while the pass goes on, else the jobs open at its start seen in no lane."""
        if self._pass is None:
            self._pass = _Pass({raw.decode() for raw, _ in client.zscan_iter(OPEN_JOBS_KEY, count=OPEN_CHUNK)})
        scan, left = self._pass, self.budget
        while left > 0 and scan.lane < len(self.lanes):
            asked = min(self.chunk, left)
            ids = client.eval(_IDS_SCRIPT, 1, self.lanes[scan.lane], scan.index, scan.index + asked - 1)
            scan.seen.update(raw.decode() for raw in ids)
            scan.index += len(ids)
            left -= len(ids)
            if len(ids) < asked:  # the lane's front is reached
                scan.lane, scan.index = scan.lane + 1, 0
        if scan.lane < len(self.lanes):
            return None
        self._pass = None
        return sorted(scan.wanted - scan.seen)
