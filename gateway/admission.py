"""One Redis round trip per request: claim the nonce and take every quota, atomically.

:class:`RedisAdmission` runs one Lua script (``EVALSHA``, loaded on first use
and again after a Redis restart) that, for one request:

1. claims the nonce, when there is one (``SET key 1 NX PX ttl``); a nonce
   already claimed ends the script: nothing is taken (the request is a replay);
2. *peeks* at each quota in order; the first with nothing left ends the
   script: nothing is taken (the request is refused, see ADR 0006);
3. *takes* one unit from each quota.

The peek and the take of each strategy are those of the ``limits`` library's
own Redis scripts, on the same keys (``nops:rl:<strategy>:<item key>``, the
sliding window counter's ``{key}`` and ``{key}/-1``) and the same data, so a
node running this script and a node still on ``limits`` share every window.
Because the whole script is atomic, the race ADR 0006 accepted (a concurrent
request taking the last unit between peek and take) no longer exists on Redis.

The script returns each peeked quota's raw window (counts and TTLs); the
window statistics (requests left, when the window resets) are computed here
with the formulas of ``limits`` (:func:`window_stats`), so the RateLimit
header fields read the same as before. Redis failures surface as the redis
exceptions; the callers decide what fails closed (the nonce) and what
degrades to memory (the quotas).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from limits import RateLimitItem, WindowStats
from redis.asyncio import Redis

__all__ = ["ADMISSION_SCRIPT", "Admitted", "RedisAdmission", "Strategy", "window_stats"]

Strategy = Literal["sliding-window-counter", "moving-window", "fixed-window"]

# KEYS: the nonce key (when ARGV[1] > 0), then each quota's keys (two for the
# sliding window counter: previous, current; one otherwise).
# ARGV: nonce TTL in ms (0: no nonce), strategy, now (s, float, moving window),
# then limit and window (s) of each quota.
# Returns {status, refused index (1-based, 0 if none), window of each quota peeked}.
# status: 0 replayed nonce (nothing peeked or taken), 1 taken, 2 refused.
ADMISSION_SCRIPT: Final = """
local ttl = tonumber(ARGV[1])
local strategy = ARGV[2]
local now = tonumber(ARGV[3])
local k = 1
if ttl > 0 then
  if not redis.call('set', KEYS[1], '1', 'NX', 'PX', ttl) then
    return {0, 0, {}}
  end
  k = 2
end
local quotas = (#ARGV - 3) / 2
local width = 1
if strategy == 'sliding-window-counter' then width = 2 end

local function peek(i)
  local limit = tonumber(ARGV[2 + 2 * i])
  local window = tonumber(ARGV[3 + 2 * i])
  local key = KEYS[k + (i - 1) * width]
  if strategy == 'sliding-window-counter' then
    local previous, current = key, KEYS[k + (i - 1) * width + 1]
    local expiry = window * 1000
    local current_ttl = tonumber(redis.call('pttl', current))
    if current_ttl > 0 and current_ttl < expiry then
      redis.call('rename', current, previous)
      redis.call('set', current, 0, 'PX', current_ttl + expiry)
    end
    local previous_count = tonumber(redis.call('get', previous)) or 0
    local previous_ttl = math.max(tonumber(redis.call('pttl', previous)), 0)
    local current_count = tonumber(redis.call('get', current)) or 0
    current_ttl = math.max(tonumber(redis.call('pttl', current)), 0)
    local weighted = math.floor(previous_count * previous_ttl / expiry) + current_count
    return limit - weighted, {previous_count, previous_ttl, current_count, current_ttl}
  elseif strategy == 'fixed-window' then
    local count = tonumber(redis.call('get', key)) or 0
    return limit - count, {count, redis.call('ttl', key)}
  end
  -- moving window: a list of timestamps, newest first, at most limit long
  local target = now - window
  local low, high, found = 0, limit - 1, nil
  while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', key, mid))
    if value and value >= target then
      found = mid
      low = mid + 1
    else
      high = mid - 1
    end
  end
  if found == nil then return limit, {'', 0} end
  return limit - (found + 1), {redis.call('lindex', key, found), found + 1}
end

local function take(i)
  local window = tonumber(ARGV[3 + 2 * i])
  local key = KEYS[k + (i - 1) * width]
  if strategy == 'sliding-window-counter' then
    local current = KEYS[k + (i - 1) * width + 1]
    if redis.call('exists', current) == 1 then
      redis.call('incrby', current, 1)
    else
      redis.call('set', current, 1, 'PX', window * 2000)
    end
  elseif strategy == 'fixed-window' then
    if redis.call('incrby', key, 1) == 1 then
      redis.call('expire', key, window)
    end
  else
    redis.call('lpush', key, ARGV[3])
    redis.call('ltrim', key, 0, tonumber(ARGV[2 + 2 * i]) - 1)
    redis.call('expire', key, window)
  end
end

local windows = {}
for i = 1, quotas do
  local remaining, raw = peek(i)
  windows[i] = raw
  if remaining < 1 then
    return {2, i, windows}
  end
end
for i = 1, quotas do
  take(i)
end
return {1, 0, windows}
"""


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the script did for one request."""

    #: False when the nonce was already claimed (nothing was taken).
    nonce_claimed: bool
    #: Index (0-based) of the quota that refused the request, or None.
    refused: int | None
    #: The window statistics of each quota peeked, in order.
    windows: tuple[WindowStats, ...]


class RedisAdmission:
    """Runs :data:`ADMISSION_SCRIPT` for one strategy under one key prefix."""

    def __init__(self, redis: Redis, *, strategy: Strategy, key_prefix: str) -> None:
        self._script = redis.register_script(ADMISSION_SCRIPT)
        self.strategy = strategy
        self._prefix = f"{key_prefix}:"

    async def admit(
        self,
        quotas: Sequence[tuple[RateLimitItem, tuple[str, ...]]],
        *,
        nonce_key: str | None = None,
        nonce_ttl_s: int = 0,
    ) -> Admitted:
        """Claim ``nonce_key`` (if given) and take one unit of each quota, or nothing."""
        keys: list[str] = []
        if nonce_key is not None:
            keys.append(nonce_key)
        now = time.time()
        args: list[str | int] = [
            max(nonce_ttl_s, 1) * 1000 if nonce_key is not None else 0,
            self.strategy,
            repr(now),
        ]
        sliding = self.strategy == "sliding-window-counter"
        for item, identifiers in quotas:
            key = item.key_for(*identifiers)
            if sliding:
                # limits' RedisStorage: "{key}" now, "{key}/-1" the previous window.
                current = f"{self._prefix}{{{key}}}"
                keys += (current + "/-1", current)
            else:
                keys.append(self._prefix + key)
            args += (item.amount, item.get_expiry())
        status, refused, raw = await self._script(keys=keys, args=args)
        if status == 0:
            return Admitted(False, None, ())
        at = time.time()
        windows = tuple(
            window_stats(self.strategy, item, value, at)
            for (item, _), value in zip(quotas, raw, strict=False)
        )
        return Admitted(True, refused - 1 if status == 2 else None, windows)


def window_stats(
    strategy: Strategy, item: RateLimitItem, raw: list[Any], now: float
) -> WindowStats:
    """``limits``' ``get_window_stats`` of ``strategy``, from the script's raw window."""
    expiry = item.get_expiry()
    if strategy == "sliding-window-counter":
        previous_count, previous_ttl_ms, current_count, current_ttl_ms = (int(v) for v in raw)
        previous_in = previous_ttl_ms / 1000
        current_in = current_ttl_ms / 1000
        weighted = previous_count * previous_in / expiry + current_count
        remaining = max(0, item.amount - math.floor(weighted))
        if not (previous_count or current_count):
            return WindowStats(now, remaining)
        previous_reset, current_reset = math.inf, math.inf
        if previous_count:
            previous_reset = previous_in % (expiry / previous_count)
        if current_count:
            current_reset = current_in % expiry
        return WindowStats(now + min(previous_reset, current_reset), remaining)
    if strategy == "fixed-window":
        count, ttl = (int(v) for v in raw)
        return WindowStats(max(ttl, 0) + now, max(0, item.amount - count))
    oldest, count = raw
    start = float(oldest) if int(count) else now
    return WindowStats(start + expiry, item.amount - int(count))
