-- Move dead letters back onto their topic: same envelope, new message id.
-- KEYS: dlq, stream. ARGV: maxlen, dead-letter ids... Returns {{dlq id, new id or false}}.
local out = {}
for i = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])[1]
  if entry then
    local body = ''
    for j = 1, #entry[2], 2 do
      if entry[2][j] == 'e' then body = entry[2][j + 1] end
    end
    local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'e', body)
    redis.call('XDEL', KEYS[1], ARGV[i])
    out[#out + 1] = {ARGV[i], id}
  else
    out[#out + 1] = {ARGV[i], false}
  end
end
return out
