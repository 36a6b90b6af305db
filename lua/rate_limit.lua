-- rate_limit.lua: fixed-window rate limit; count a call only if it is allowed.
--
-- KEYS[1]  counter key, crm:ratelimit:<api>:<window>
-- ARGV[1]  limit: calls allowed per window (integer > 0)
-- ARGV[2]  window length, in milliseconds (integer > 0)
-- ARGV[3]  cost of this call (integer > 0, usually 1)
--
-- The window starts with the first allowed call and ends when the key expires; the expiry
-- is set here, in the same atomic step as the first increment, so a counter can never be
-- left without one. Time is Redis's own clock (PEXPIRE/PTTL), never the caller's.
--
-- Reply: {allowed, count, ttl_ms}
--   allowed  1 if the call was counted, 0 if it was refused (and not charged)
--   count    calls counted in the current window after this decision
--   ttl_ms   milliseconds until the window resets
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local raw = redis.pcall('GET', KEYS[1])
local count = 0
if type(raw) == 'string' then
    count = tonumber(raw)
    -- Not a counter (written by someone else): start a fresh window rather than fail.
    if not count or count ~= math.floor(count) then
        redis.call('DEL', KEYS[1])
        count = 0
    end
elseif type(raw) == 'table' and raw.err then
    -- Wrong type at our key: replace it with a counter.
    redis.call('DEL', KEYS[1])
end

if count + cost > limit then
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl < 0 then
        -- A counter without expiry would block forever: give it one now.
        redis.call('PEXPIRE', KEYS[1], window_ms)
        ttl = window_ms
    end
    return {0, count, ttl}
end

count = redis.call('INCRBY', KEYS[1], cost)
local ttl = window_ms
if count == cost then
    redis.call('PEXPIRE', KEYS[1], window_ms)
else
    ttl = redis.call('PTTL', KEYS[1])
    if ttl < 0 then
        redis.call('PEXPIRE', KEYS[1], window_ms)
        ttl = window_ms
    end
end
return {1, count, ttl}
