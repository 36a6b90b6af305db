-- rate_limit.lua: fixed-window rate limit; count a call only if it is allowed.
--
-- KEYS[1]  counter key, crm:ratelimit:<api>:<window>
-- ARGV[1]  limit: calls allowed per window (integer, 0 < limit <= 2^53 - 1)
-- ARGV[2]  window length, in milliseconds (integer > 0)
-- ARGV[3]  cost of this call (integer, 0 < cost <= limit, usually 1), in decimal digits:
--          it is handed to INCRBY/DECRBY as it came, never through a Lua number (which
--          would format 10^17 as "1e+17")
--
-- The window starts with the first allowed call and ends when the key expires; the expiry
-- is set here, in the same atomic step as the first increment, so a counter can never be
-- left without one, nor with one longer than its window. Time is Redis's own clock
-- (PEXPIRE/PTTL), never the caller's.
-- Increment first and take a refused call back: the script is atomic, so nobody sees the
-- overshoot, and the common (allowed) case costs one INCRBY and one PTTL.
--
-- A counter always holds an integer in [0, 2^53 - 1]: no limit is larger, and refused
-- calls are taken back. Anything else at the key (a number below zero or above 2^53 - 1,
-- such as one INCRBY would overflow; a non-integer; another type) was written by someone
-- else and is replaced by a fresh window. Whether the value is garbage is judged from the
-- value itself (TYPE, GET), never from an error alone: any other failure (OOM, NOPERM, a
-- bad argument) fails the call and leaves the live counter alone.
--
-- Reply: {allowed, count, ttl_ms}
--   allowed  1 if the call was counted, 0 if it was refused (and not charged)
--   count    calls counted in the current window after this decision (>= 0; at most
--            limit when allowed; above it only when refused after the limit was lowered)
--   ttl_ms   milliseconds until the window resets (0 <= ttl_ms <= window)
local limit = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
-- The largest count: exact in Lua's numbers (doubles), as every limit is.
local MAX_COUNT = 9007199254740991

if not string.match(ARGV[3], '^[1-9]%d*$') then
    return redis.error_reply('ERR cost must be a positive integer in decimal digits')
end

-- True if the key holds something that is no counter (see above); false if it holds a
-- counter or nothing, so that an error cannot have been the value's fault.
local function garbage(key)
    local kind = redis.call('TYPE', key)['ok']
    if kind ~= 'string' then
        return kind ~= 'none'
    end
    local value = redis.call('GET', key)
    if value == '0' then
        return false
    end
    -- At most 16 digits without a leading zero, as Redis writes integers up to 2^53 - 1.
    if #value > 16 or not string.match(value, '^[1-9]%d*$') then
        return true
    end
    return tonumber(value) > MAX_COUNT
end

-- Replace garbage with a fresh window holding this call; returns the new count.
local function fresh()
    redis.call('SET', KEYS[1], ARGV[3])
    return cost
end

local count = redis.pcall('INCRBY', KEYS[1], ARGV[3])
if type(count) == 'table' then
    if not garbage(KEYS[1]) then
        return redis.error_reply(count.err or 'ERR INCRBY failed')
    end
    count = fresh()
elseif count < cost then
    -- It held a number below zero.
    count = fresh()
end

local allowed = 1
if count > limit then
    count = redis.call('DECRBY', KEYS[1], ARGV[3])
    allowed = 0
    if count > MAX_COUNT then
        -- It held more than any limit. (Exact, although Lua's numbers are not up here:
        -- DECRBY answers what the counter held, and 2^53 - 1 and 2^53 are both exact.)
        count = fresh()
        allowed = 1
    end
end

local ttl
if count == cost and allowed == 1 then
    -- First call of a new window.
    redis.call('PEXPIRE', KEYS[1], window_ms)
    ttl = window_ms
else
    ttl = redis.call('PTTL', KEYS[1])
    if ttl < 0 or ttl > window_ms then
        -- A counter without expiry would block forever, and one expiring after its
        -- window would make the window longer: give it the window's.
        redis.call('PEXPIRE', KEYS[1], window_ms)
        ttl = window_ms
    end
end
return {allowed, count, ttl}
