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
-- Increment first and take a refused call back: the script is atomic, so nobody sees the
-- overshoot, and the common (allowed) case costs one INCRBY and one PTTL.
--
-- Reply: {allowed, count, ttl_ms}
--   allowed  1 if the call was counted, 0 if it was refused (and not charged)
--   count    calls counted in the current window after this decision
--   ttl_ms   milliseconds until the window resets
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local count = redis.pcall('INCRBY', KEYS[1], cost)
if type(count) == 'table' then
    local err = count.err or ''
    -- Only a value that is not a counter (garbage or the wrong type, written by someone
    -- else) is replaced with a fresh window. Any other error (OOM, NOPERM ...) must leave
    -- the live counter alone: fail the call instead.
    if not (string.find(err, 'WRONGTYPE', 1, true) or string.find(err, 'not an integer', 1, true)) then
        return redis.error_reply(err)
    end
    redis.call('DEL', KEYS[1])
    count = redis.call('INCRBY', KEYS[1], cost)
end

local allowed = 1
if count > limit then
    count = redis.call('DECRBY', KEYS[1], cost)
    allowed = 0
end

local ttl
if count == cost and allowed == 1 then
    -- First call of a new window.
    redis.call('PEXPIRE', KEYS[1], window_ms)
    ttl = window_ms
else
    ttl = redis.call('PTTL', KEYS[1])
    if ttl < 0 then
        -- A counter without expiry would block forever: give it one now.
        redis.call('PEXPIRE', KEYS[1], window_ms)
        ttl = window_ms
    end
end
return {allowed, count, ttl}
