-- rate_limits.lua: several rate limits, each with its own algorithm, in one atomic step;
-- a cost is charged to every limit or to none.
--
-- KEYS[i]   the state of limit i (crm:ratelimit:[{group}:]<name>:<window>[:<algorithm>|:<tz>]);
--           on a cluster every key of one call is in one hash slot (a common {group})
-- ARGV[1]   now, in microseconds since the epoch, or '' for Redis's own clock (TIME). Only
--           tests pass a time: it drives the sliding, gcra and calendar algorithms
--           (the anchored fixed window always runs on key expiry, Redis's clock)
-- ARGV[2]   cost (integer >= 0, decimal digits): units to charge ('c'), at most how many
--           to take ('u'), or to give back ('r'); 0 with 'c' is a peek
-- ARGV[3]   mode: 'c' check and charge all or none; 'u' take up to ARGV[2] units, as many
--           as every limit allows now; 'r' refund ARGV[2] units
-- ARGV[4 + 6(i-1) .. 9 + 6(i-1)]   limit i: kind, limit, then per kind:
--   'f' anchored fixed window: window_ms (the window starts with the first charge and
--       ends when the key expires: the key and counter of check_rate_limit / rate_limit.lua)
--   's' sliding-window counter: window_us (windows aligned to multiples of it; state is a
--       hash {w = window index, c = its count, p = the previous window's count})
--   'g' GCRA: emission interval T_us (integer), and limit is the burst (state: the
--       theoretical arrival time, TAT, in microseconds, as a string)
--   'c' calendar window: b0, b1, b2, b3, consecutive period starts in microseconds
--       (computed by the caller from the IANA zone; the period holding `now` is taken,
--       so Redis's clock decides; a `now` outside [b0, b3) is an error); state is a hash
--       {s = the period's start as sent, c = its count}
--
-- Every key a charge writes gets an expiry, relative to `now`, after which its state no
-- longer matters. A refund never takes a count below zero and never moves an expiry.
-- A key holding what this script never writes there (another type, a non-number) is
-- read as empty and replaced on the next charge.
--
-- Reply: {allowed, granted, then per limit: allowed_i, count_i, retry_us_i, reset_us_i}
--   allowed     1 if every limit allowed (mode 'c'), granted > 0 ('u'), 1 ('r')
--   granted     units charged ('c': cost or 0; 'u': 0..cost) or refunded ('r')
--   allowed_i   1 if limit i had room for the cost (for 'u' and a peek: for one unit)
--   count_i     units counted after this call (>= 0; for 'g', units in the bucket)
--   retry_us_i  microseconds until limit i would allow the cost (0 when it does now)
--   reset_us_i  microseconds until limit i is back to full capacity
local now = 0
if ARGV[1] ~= '' then
    now = tonumber(ARGV[1])
else
    -- The anchored fixed window needs no clock (its key's expiry is its clock).
    for i = 1, #KEYS do
        if ARGV[4 + 6 * (i - 1)] ~= 'f' then
            local t = redis.call('TIME')
            now = tonumber(t[1]) * 1000000 + tonumber(t[2])
            break
        end
    end
end
local cost = tonumber(ARGV[2])
local mode = ARGV[3]
local MAX_COUNT = 9007199254740991
local floor = math.floor
local ceil = math.ceil

-- A count stored by this script: digits only, at most 2^53 - 1; anything else is 0.
local function as_count(value)
    if type(value) ~= 'string' or #value > 16 or not string.match(value, '^%d+$') then
        return 0, value ~= nil and value ~= false
    end
    local n = tonumber(value)
    if n > MAX_COUNT then
        return 0, true
    end
    return n, false
end

-- Reads a hash's fields; a key of another type reads as empty (garbage = true).
local function hmget(key, ...)
    local got = redis.pcall('HMGET', key, ...)
    if got.err then
        return {}, true
    end
    return got, false
end

local function expire_us(key, us)
    redis.call('PEXPIRE', key, ceil(us / 1000))
end

-- Each reader returns a state: cap (units allowed now), count, reset_us, and functions
-- retry(x), charge(k), refund(k), after(k) (the count after charging k).
local readers = {}

readers['f'] = function(key, limit, window_ms)
    local got = redis.pcall('GET', key)
    local count, garbage = 0, false
    if type(got) == 'table' and got.err then
        garbage = true
    elseif got then
        count, garbage = as_count(got)
    end
    local ttl_ms = 0
    if count > 0 then
        ttl_ms = redis.call('PTTL', key)
        if ttl_ms < 0 or ttl_ms > window_ms then
            -- No expiry, or one after the window's end: give it the window's.
            redis.call('PEXPIRE', key, window_ms)
            ttl_ms = window_ms
        end
    end
    local s = {cap = limit - count, count = count, reset = ttl_ms * 1000}
    s.retry = function(x)
        if count + x <= limit then return 0 end
        return ttl_ms * 1000
    end
    s.charge = function(k)
        if garbage then redis.call('DEL', key) end
        local n = redis.call('INCRBY', key, k)
        if n == k then
            redis.call('PEXPIRE', key, window_ms)
            s.reset = window_ms * 1000
        end
        s.count = n
    end
    s.refund = function(k)
        if count > 0 then
            s.count = redis.call('DECRBY', key, math.min(k, count))
        end
    end
    return s
end

readers['s'] = function(key, limit, window_us)
    local idx = floor(now / window_us)
    local elapsed = now - idx * window_us
    local got, garbage = hmget(key, 'w', 'c', 'p')
    local w = tonumber(got[1])
    local c, p = 0, 0
    if w == idx then
        c = as_count(got[2])
        p = as_count(got[3])
    elseif w == idx - 1 then
        p = as_count(got[2])
    end
    -- The estimate: the previous window's count weighted by its share still in the
    -- sliding window, rounded down, plus this window's.
    local function estimate(prev, e)
        return floor(prev * (window_us - e) / window_us)
    end
    local count = estimate(p, elapsed) + c
    local s = {cap = limit - count, count = count}
    local function reset_of(cc, pp)
        if cc > 0 then return 2 * window_us - elapsed end
        if pp > 0 then return window_us - elapsed end
        return 0
    end
    s.reset = reset_of(c, p)
    -- First microsecond from `from` on at which estimate(prev, e) <= room.
    local function wait(prev, room, from)
        if prev <= room then return from end
        local e = floor(window_us - (room + 1) * window_us / prev) + 1
        if e < from then e = from end
        while e < window_us and estimate(prev, e) > room do e = e + 1 end
        return e
    end
    s.retry = function(x)
        if count + x <= limit then return 0 end
        if c + x <= limit then
            return wait(p, limit - c - x, elapsed) - elapsed
        end
        -- Not in this window: from the next, whose previous count is this one's.
        return window_us - elapsed + wait(c, limit - x, 0)
    end
    s.charge = function(k)
        if w == idx and not garbage then
            -- Same window: its expiry, set by its first charge, is already its end.
            c = redis.call('HINCRBY', key, 'c', k)
        else
            if garbage then redis.call('DEL', key) end
            c = c + k
            redis.call('HSET', key, 'w', idx, 'c', c, 'p', p)
            expire_us(key, 2 * window_us - elapsed)
        end
        s.count = count + k
        s.reset = reset_of(c, p)
    end
    s.refund = function(k)
        local from_c = math.min(k, c)
        local from_p = math.min(k - from_c, p)
        if from_c + from_p > 0 then
            c = c - from_c
            p = p - from_p
            if w == idx then
                redis.call('HSET', key, 'c', c, 'p', p)
            else
                -- Stored as of the previous window (its c is our p): keep it so, and
                -- keep its expiry, which ends when p stops mattering.
                redis.call('HSET', key, 'c', p)
            end
        end
        s.count = estimate(p, elapsed) + c
        s.reset = reset_of(c, p)
    end
    return s
end

readers['g'] = function(key, burst, t_us)
    local got = redis.pcall('GET', key)
    local tat, garbage = now, false
    if type(got) == 'table' and got.err then
        garbage = true
    elseif got then
        local stored = tonumber(got)
        if stored == nil or not string.match(got, '^%d+$') then
            garbage = true
        elseif stored > now + burst * t_us then
            -- Further ahead than any charge can put it: not ours.
            garbage = true
        elseif stored > now then
            tat = stored
        end
    end
    local held = ceil((tat - now) / t_us)
    local s = {cap = burst - held, count = held, reset = tat - now}
    s.retry = function(x)
        local over = tat - now + x * t_us - burst * t_us
        if over <= 0 then return 0 end
        return over
    end
    s.charge = function(k)
        tat = tat + k * t_us
        redis.call('SET', key, string.format('%.0f', tat), 'PX', ceil((tat - now) / 1000))
        s.count = ceil((tat - now) / t_us)
        s.reset = tat - now
    end
    s.refund = function(k)
        if tat <= now then return end
        tat = tat - k * t_us
        if tat <= now then
            tat = now
            redis.call('DEL', key)
        else
            redis.call('SET', key, string.format('%.0f', tat), 'KEEPTTL')
        end
        s.count = ceil((tat - now) / t_us)
        s.reset = tat - now
    end
    return s
end

readers['c'] = function(key, limit, b0, b1, b2, b3, a0, a1, a2)
    local start, finish
    if now < b0 or now >= b3 then
        return nil
    elseif now < b1 then
        start, finish = a0, b1
    elseif now < b2 then
        start, finish = a1, b2
    else
        start, finish = a2, b3
    end
    local got, garbage = hmget(key, 's', 'c')
    local count = 0
    if got[1] == start then
        count = as_count(got[2])
    end
    local s = {cap = limit - count, count = count, reset = finish - now}
    s.retry = function(x)
        if count + x <= limit then return 0 end
        return finish - now
    end
    s.charge = function(k)
        if garbage then redis.call('DEL', key) end
        if got[1] == start then
            -- This period's expiry was set by its first charge: its end.
            s.count = redis.call('HINCRBY', key, 'c', k)
        else
            redis.call('HSET', key, 's', start, 'c', k)
            s.count = k
            expire_us(key, finish - now)
        end
    end
    s.refund = function(k)
        if count > 0 then
            s.count = redis.call('HINCRBY', key, 'c', -math.min(k, count))
        end
    end
    return s
end

local states = {}
local least = nil
for i = 1, #KEYS do
    local base = 4 + 6 * (i - 1)
    local kind = ARGV[base]
    local reader = readers[kind]
    if reader == nil then
        return redis.error_reply('ERR unknown rate-limit kind ' .. tostring(kind))
    end
    local s
    if kind == 'c' then
        s = reader(KEYS[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
            tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5]),
            ARGV[base + 2], ARGV[base + 3], ARGV[base + 4])
        if s == nil then
            return redis.error_reply('ERR calendar boundaries do not hold the server time')
        end
    else
        s = reader(KEYS[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]))
    end
    states[i] = s
    if least == nil or s.cap < least then
        least = s.cap
    end
end

local allowed, granted = 1, 0
local want = cost
if mode == 'c' then
    if cost == 0 then
        -- A peek: would one unit be allowed? Nothing is charged.
        want = 1
        if least < 1 then allowed = 0 end
    elseif least < cost then
        allowed = 0
    else
        granted = cost
    end
elseif mode == 'u' then
    want = 1
    granted = math.max(0, math.min(cost, least))
    if granted == 0 then allowed = 0 end
elseif mode == 'r' then
    granted = cost
else
    return redis.error_reply('ERR unknown mode')
end

local reply = {allowed, granted}
for i = 1, #KEYS do
    local s = states[i]
    local ok = 1
    local retry = 0
    if mode ~= 'r' then
        if s.cap < want then
            ok = 0
            retry = s.retry(want)
        end
    end
    if granted > 0 then
        if mode == 'r' then
            s.refund(granted)
        else
            s.charge(granted)
        end
    end
    reply[#reply + 1] = ok
    reply[#reply + 1] = math.max(0, s.count)
    reply[#reply + 1] = retry
    reply[#reply + 1] = s.reset
end
return reply
