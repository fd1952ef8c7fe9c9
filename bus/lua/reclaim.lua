-- Reclaim a group's deliveries idle past the visibility timeout: those
-- already delivered max-deliveries times go to the dead-letter stream with
-- their delivery count and last consumer (and are acked off the group);
-- the rest are claimed for the calling consumer (XCLAIM: their delivery
-- count goes up by one). Entries trimmed from the stream are acked away.
-- KEYS: stream, dlq. ARGV: group, consumer, min idle ms, max deliveries,
-- count, dlq maxlen, now ms. Returns {dead, {id, deliveries, envelope}...}.
local stream, dlq, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local max_deliveries = tonumber(ARGV[4])
local function envelope(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then return fields[i + 1] end
  end
  return ''
end
local pending = redis.call('XPENDING', stream, group, 'IDLE', ARGV[3], '-', '+', ARGV[5])
local dead, claim, deliveries = 0, {}, {}
for _, p in ipairs(pending) do
  local id, owner, count = p[1], p[2], p[4]
  if count >= max_deliveries then
    local entry = redis.call('XRANGE', stream, id, id)[1]
    if entry then
      redis.call('XADD', dlq, 'MAXLEN', '~', ARGV[6], '*', 'e', envelope(entry[2]),
        'source_id', id, 'group', group, 'deliveries', count, 'last_consumer', owner,
        'reason', 'max_deliveries', 'dead_at', ARGV[7])
      dead = dead + 1
    end
    redis.call('XACK', stream, group, id)
  else
    claim[#claim + 1] = id
    deliveries[id] = count + 1
  end
end
local out = {dead}
if #claim > 0 then
  local claimed = redis.call('XCLAIM', stream, group, consumer, ARGV[3], unpack(claim))
  for _, entry in ipairs(claimed) do
    if entry and entry[2] then
      out[#out + 1] = {entry[1], deliveries[entry[1]], envelope(entry[2])}
    elseif entry then
      redis.call('XACK', stream, group, entry[1])
    end
  end
end
return out
