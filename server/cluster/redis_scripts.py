"""The Redis side of :mod:`server.cluster.redis_backend`: key names and the
Lua scripts that make each primitive one atomic step.

Every fenced script starts with the same check (``HGET lease token ==
ARGV[1]``) and writes nothing when it fails (Rule 3 of
:mod:`server.cluster.backend`). A script validates everything before its
first write, because Redis does not roll a script back when it returns
early.

Shapes (prefix ``tss:``, see docs/cluster.md):

* ``fence``: the only source of tokens (Rule 1): INCR, never below the Redis
  clock in microseconds (see ``_NEXT_TOKEN``).
* ``lease:{principal}:{sid}``: hash ``node``, ``token``, ``busy`` ("1"/"0"),
  ``run`` ("" for none), ``prev`` (the token it was handed over from);
  PEXPIRE ttl (Rule 2: an expired lease is a missing key).
* ``run:{id}:events``: stream, entry id ``0-(seq+1)``, fields ``seq``,
  ``t`` ("1" on the terminal event) and ``e`` (the event's JSON; a reader
  takes ``seq`` from the entry, so :func:`end_orphan`'s event needs none).
* ``run:{id}``: the run record's JSON.
* ``session:{principal}:{sid}:runs``: zset of run ids scored by
  ``created_at``, the newest :data:`SESSION_RUNS_KEPT` kept.
* ``inbox:{node}``: stream of intents (field ``i``, JSON), MAXLEN ~
  :data:`INBOX_MAXLEN`, PEXPIRE :data:`INBOX_TTL` refreshed on send and read.
* ``reply:{id}``: list of reply JSON, PEXPIRE ``REPLY_TTL``; read with
  ``BLMOVE key key LEFT LEFT``, which returns the head and leaves it in place
  (a reply lost on the way to a waiter that timed out is read again).

Keys a script touches are passed in ``KEYS`` except the records that
``session_runs`` looks up by id: standalone Redis/Valkey (or Sentinel),
not Redis Cluster.
"""

from __future__ import annotations

from typing import Final

from .backend import SESSION_RUNS_KEPT as SESSION_RUNS_KEPT
from .backend import SessionRef

PREFIX: Final = "tss:"
INBOX_MAXLEN: Final = 10_000
INBOX_TTL: Final = 86_400.0
# A run's stream and record live this long after their last write while the
# run is not terminal, so a run whose owner vanished and whose session is
# never used again does not stay in Redis for ever.
LIVE_RUN_TTL: Final = 86_400.0
# The retention clock never runs shorter than this, so a reader following a
# run live still finds its terminal event (--retain-seconds 0).
MIN_RETAIN: Final = 1.0


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.fence = f"{prefix}fence"

    def lease(self, session: SessionRef) -> str:
        return f"{self.prefix}lease:{session.principal}:{session.session_id}"

    def session_runs(self, session: SessionRef) -> str:
        return f"{self.prefix}session:{session.principal}:{session.session_id}:runs"

    def run(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def events(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:events"

    def inbox(self, node: str) -> str:
        return f"{self.prefix}inbox:{node}"

    def reply(self, reply_to: str) -> str:
        return f"{self.prefix}reply:{reply_to}"


def milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


# A holder as scripts return it: {0, node, token, pttl, busy, run}.
_HOLDER = """
local function holder(key)
  local h = redis.call('HMGET', key, 'node', 'token', 'busy', 'run')
  if not h[2] then return nil end
  return {0, h[1], h[2], redis.call('PTTL', key), h[3] or '0', h[4] or ''}
end
"""

# The last entry of a run's stream: its seq (-1: none) and whether it is
# the terminal event.
_LAST_EVENT = """
local function last_event(key)
  local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if not top[1] then return -1, false end
  local fields = top[1][2]
  local terminal = false
  for i = 1, #fields, 2 do
    if fields[i] == 't' and fields[i + 1] == '1' then terminal = true end
  end
  return tonumber(string.sub(top[1][1], 3)) - 1, terminal
end
"""

# The next fencing token: INCR of the fence, but never below the Redis
# clock in microseconds. A Redis that lost its data (restarted without
# persistence, a failover to a replica that missed the last INCRs) starts
# again above every token it gave before, so a paused node's old token can
# never match a new lease. Tokens stay below 2^53 (exact in Lua) until 2255.
_NEXT_TOKEN = """
local function next_token(fence)
  local now = redis.call('TIME')
  local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local token = redis.call('INCR', fence)
  if token < floor then
    token = floor
    redis.call('SET', fence, string.format('%d', token))
  end
  return token
end
"""

# KEYS lease, fence; ARGV node, ttl_ms.
# -> {1, token} (taken, busy: a fresh lease is taken for a submission on
#    its way) or a holder.
ACQUIRE = (
    _HOLDER
    + _NEXT_TOKEN
    + """
local h = holder(KEYS[1])
if h then return h end
local token = next_token(KEYS[2])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'token', string.format('%d', token),
           'busy', '1', 'run', '')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, token}
"""
)

# KEYS lease -> a holder or nil.
HOLDER = _HOLDER + "return holder(KEYS[1])\n"

# KEYS lease; ARGV token, ttl_ms, busy, run -> 1 / 0.
RENEW = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'busy', ARGV[3], 'run', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS lease; ARGV token -> 1 / 0.
RELEASE = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS lease, fence; ARGV token, to_node, ttl_ms -> the new token, or 0.
# A handover that already happened (a retry after a lost answer: the lease
# names to_node and was handed over from this token) answers its token again
# and writes nothing.
HAND_OVER = (
    _NEXT_TOKEN
    + """
local h = redis.call('HMGET', KEYS[1], 'token', 'node', 'prev')
if h[1] ~= ARGV[1] then
  if h[1] and h[3] == ARGV[1] and h[2] == ARGV[2] then return tonumber(h[1]) end
  return 0
end
local token = next_token(KEYS[2])
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'token', string.format('%d', token),
           'busy', '1', 'run', '', 'prev', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return token
"""
)

# KEYS lease, events, record, session runs;
# ARGV token, max_events, retain_ms, live_ms, record ('' none), created_at,
#      run_id, runs kept per session, then (seq, terminal, json) per event.
# -> 1 written, 0 not the lease holder, 2 after a terminal event, -1 gap.
# Events the stream already has (seq <= its last) are skipped, so a publish
# retried after an unknown outcome appends nothing twice.
PUBLISH = (
    _LAST_EVENT
    + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local last, ended = last_event(KEYS[2])
local first = nil
for i = 9, #ARGV, 3 do
  if tonumber(ARGV[i]) > last then first = i break end
end
if first then
  if ended then return 2 end
  if tonumber(ARGV[first]) ~= last + 1 then return -1 end
elseif ended and #ARGV < 9 then
  return 2
end
if first then
  for i = first, #ARGV, 3 do
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '0-' .. (tonumber(ARGV[i]) + 1),
               'seq', ARGV[i], 't', ARGV[i + 1], 'e', ARGV[i + 2])
    if ARGV[i + 1] == '1' then ended = true end
  end
end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[3], ARGV[5])
  redis.call('ZADD', KEYS[4], 'NX', ARGV[6], ARGV[7])
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -1 - tonumber(ARGV[8]))
end
local ttl = ended and ARGV[3] or ARGV[4]
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if redis.call('PTTL', KEYS[4]) < tonumber(ttl) then redis.call('PEXPIRE', KEYS[4], ttl) end
return 1
"""
)

# KEYS lease, events, record, session runs;
# ARGV token ("": only if nobody holds the lease), terminal json, record
# json, retain_ms, created_at, run_id, runs kept per session
# -> the terminal's seq, or -1 (not the lease holder / held), -2 (already ended).
END_ORPHAN = (
    _LAST_EVENT
    + """
if ARGV[1] == '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
elseif redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
local last, ended = last_event(KEYS[2])
if ended then return -2 end
local seq = last + 1
redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'seq', seq, 't', '1', 'e', ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], 'NX', ARGV[5], ARGV[6])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -1 - tonumber(ARGV[7]))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
if redis.call('PTTL', KEYS[4]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[4], ARGV[4]) end
return seq
"""
)

# KEYS lease, events, record, session runs; ARGV token, run_id -> 1 / 0.
FORGET_RUN = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
return 1
"""

# KEYS session runs; ARGV limit, record key prefix -> record JSONs, newest
# first. Ids whose record expired are dropped from the zset.
SESSION_RUNS = """
local ids = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local record = redis.call('GET', ARGV[2] .. id)
  if record then table.insert(out, record) else redis.call('ZREM', KEYS[1], id) end
end
return out
"""

# KEYS inbox; ARGV maxlen, ttl_ms, intent json -> the entry id.
SEND_INTENT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'i', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
"""

# KEYS reply; ARGV reply json, ttl_ms.
REPLY = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
