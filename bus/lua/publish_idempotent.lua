-- Publish with an idempotency key, atomically: the first call appends the
-- message and remembers "<message id> <event id> <fingerprint>" under the
-- key for the TTL; every later call (concurrent or retried) gets that back.
-- KEYS: stream, idempotency key. ARGV: maxlen, envelope, ttl s, event id,
-- fingerprint. Returns {1, message id} when it published, {0, remembered}.
local prior = redis.call('GET', KEYS[2])
if prior then return {0, prior} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
redis.call('SET', KEYS[2], id .. ' ' .. ARGV[4] .. ' ' .. ARGV[5], 'EX', ARGV[3])
return {1, id}
