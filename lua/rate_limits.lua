-- rate_limits.lua: several rate limits, each with its own algorithm, in one atomic step;
-- a cost is charged to every limit or to none.
--
-- KEYS[i]   the state of limit i (crm:ratelimit:[{group}:]<name>:<window>[:<algorithm>|:<tz>]);
--           on a cluster every key of one call is in one hash slot (a common {group})
-- ARGV[1]   now, in microseconds since the epoch, or '' for Redis's own clock (TIME, read
--           only when a limit needs it). Only tests pass a time: it drives the sliding,
--           gcra and calendar algorithms (the anchored fixed window always runs on key
--           expiry, Redis's clock)
-- ARGV[2]   cost (integer >= 0, decimal digits): units to charge ('c'), at most how many
--           to take ('u'), or to give back ('r'); 0 with 'c' is a peek
-- ARGV[3]   mode: 'c' check and charge all or none; 'u' take up to ARGV[2] units, as many
--           as every limit allows now; 'r' refund ARGV[2] units
-- ARGV[4 ..]   the limits, in KEYS order, one after the other: kind, limit, then per kind
--   'f' (3 entries) anchored fixed window: window_ms (the window starts with the first
--       charge and ends when the key expires: the key and counter of check_rate_limit /
--       rate_limit.lua)
--   's' (3 entries) sliding-window counter: window_us (windows aligned to multiples of
--       it; state is a hash {w = window index, c = its count, p = the previous window's})
--   'g' (3 entries) GCRA: emission interval T_us (integer), and limit is the burst
--       (state: the theoretical arrival time, TAT, in microseconds, as a string)
--   'c' (6 entries) calendar window: b0, b1, b2, b3, consecutive period starts in
--       microseconds (computed by the caller from the IANA zone; the period holding `now`
--       is taken, so Redis's clock decides; a `now` outside [b0, b3) is an error); state
--       is a hash {s = the period's start as sent, c = its count}
--
-- Every key a charge writes gets an expiry, relative to `now`, after which its state no
-- longer matters: a fixed, sliding or calendar window's when the window starts (not on
-- every charge), gcra's with every charge (it follows the TAT). A refund never takes a
-- count below zero and never moves an expiry. A key holding what this script never
-- writes there (another type, a non-number) is read as empty and replaced on the next
-- charge.
--
-- Commands: every limit is read (fixed: GET, then PTTL if it counts; sliding and
-- calendar: HMGET; gcra: GET), then charged (INCRBY / HINCRBY / SET PX, plus PEXPIRE when
-- a window starts). In mode 'c' with a cost, the last fixed limit is read last and, when
-- every other limit allows, charged first (INCRBY, PTTL) and taken back (DECRBY) if it
-- refuses: as rate_limit.lua does; a refused set stays uncharged. One limit checked with
-- a cost (the hot path) runs code of its own per algorithm, with the same answers.
--
-- Reply: {allowed, granted, then per limit: allowed_i, count_i, retry_us_i, reset_us_i}
--   allowed     1 if every limit allowed (mode 'c'), granted > 0 ('u'), 1 ('r')
--   granted     units charged ('c': cost or 0; 'u': 0..cost) or refunded ('r')
--   allowed_i   1 if limit i had room for the cost (for 'u' and a peek: for one unit)
--   count_i     units counted after this call (>= 0; for 'g', units in the bucket)
--   retry_us_i  microseconds until limit i would allow the cost (0 when it does now)
--   reset_us_i  microseconds until limit i is back to full capacity
--
-- Written flat for speed (it runs on every send; see README, "Measured"): no closure or
-- table per limit, state in one preallocated array (S, ten slots per limit), every
-- argument converted once (tonumber costs about as much as a GET here), numbers handed
-- to Redis as numbers (Redis writes integers below 1e17 in full), and each Redis command
-- the least the algorithm needs.
local call, pcall = redis.call, redis.pcall
local tonumber, type, unpack = tonumber, type, unpack
local floor, ceil, match = math.floor, math.ceil, string.match
local MAX_COUNT = 9007199254740991
local nkeys = #KEYS
local cost = tonumber(ARGV[2])
local mode = ARGV[3]
if mode ~= 'c' and mode ~= 'u' and mode ~= 'r' then
    return redis.error_reply('ERR unknown mode')
end

-- The first microsecond from `from` on at which a sliding estimate of `prev` units in the
-- previous window is at most `room` (a refused sliding limit's retry time).
local function sliding_wait(window_us, prev, room, from)
    if prev <= room then return from end
    local e = floor(window_us - (room + 1) * window_us / prev) + 1
    if e < from then e = from end
    while e < window_us and floor(prev * (window_us - e) / window_us) > room do
        e = e + 1
    end
    return e
end

-- One limit, checked and charged (cost >= 1): the hot path, its own code per algorithm
-- with nothing but locals. It answers exactly what the general path below would.
if nkeys == 1 and mode == 'c' and cost > 0 then
    local key, kind = KEYS[1], ARGV[4]
    local limit = tonumber(ARGV[5])
    if kind == 'f' then
        if cost <= limit then
            -- Charge first, take it back if refused (as rate_limit.lua does).
            local window_ms = tonumber(ARGV[6])
            local n = pcall('INCRBY', key, ARGV[2])
            local before = -1
            if type(n) == 'number' then before = n - cost end
            if before < 0 or before > MAX_COUNT then
                -- Not a count of ours (another type, a non-integer, out of range): a
                -- fresh window holding this charge.
                call('SET', key, ARGV[2], 'PX', window_ms)
                return {1, cost, 1, cost, 0, window_ms * 1000}
            elseif before == 0 then
                call('PEXPIRE', key, window_ms)
                return {1, cost, 1, n, 0, window_ms * 1000}
            end
            local ttl_ms = call('PTTL', key)
            if ttl_ms < 0 or ttl_ms > window_ms then
                -- No expiry, or one after the window's end: give it the window's.
                call('PEXPIRE', key, window_ms)
                ttl_ms = window_ms
            end
            if n > limit then
                call('DECRBY', key, ARGV[2])
                return {0, 0, 0, before, ttl_ms * 1000, ttl_ms * 1000}
            end
            return {1, cost, 1, n, 0, ttl_ms * 1000}
        end
    else
        local now
        if ARGV[1] ~= '' then
            now = tonumber(ARGV[1])
        else
            local t = call('TIME')
            now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        end
        if kind == 'g' then
            local t_us = tonumber(ARGV[6])
            local got = pcall('GET', key)
            local tat = now
            if type(got) == 'string' then
                -- Ours only if digits, and no further ahead than a charge can put it.
                local stored = tonumber(got)
                if stored and stored > now and stored <= now + limit * t_us
                    and match(got, '^%d+$') then
                    tat = stored
                end
            end
            local held = ceil((tat - now) / t_us)
            if limit - held < cost then
                local retry = tat - now + cost * t_us - limit * t_us
                if retry < 0 then retry = 0 end
                return {0, 0, 0, held, retry, tat - now}
            end
            tat = tat + cost * t_us
            call('SET', key, tat, 'PX', ceil((tat - now) / 1000))
            return {1, cost, 1, ceil((tat - now) / t_us), 0, tat - now}
        elseif kind == 's' then
            local window_us = tonumber(ARGV[6])
            local idx = floor(now / window_us)
            local elapsed = now - idx * window_us
            local got = pcall('HMGET', key, 'w', 'c', 'p')
            local garbage = false
            if got.err then
                got, garbage = {}, true
            end
            local w = tonumber(got[1])
            local c, p = 0, 0
            local v
            if w == idx then
                v = got[2]
                if v and #v <= 16 and match(v, '^%d+$') then c = tonumber(v) end
                if c > MAX_COUNT then c = 0 end
                v = got[3]
                if v and #v <= 16 and match(v, '^%d+$') then p = tonumber(v) end
                if p > MAX_COUNT then p = 0 end
            elseif w == idx - 1 then
                v = got[2]
                if v and #v <= 16 and match(v, '^%d+$') then p = tonumber(v) end
                if p > MAX_COUNT then p = 0 end
            end
            local count = floor(p * (window_us - elapsed) / window_us) + c
            if limit - count < cost then
                local retry, reset = 0, 0
                if c + cost <= limit then
                    retry = sliding_wait(window_us, p, limit - c - cost, elapsed) - elapsed
                else
                    retry = window_us - elapsed + sliding_wait(window_us, c, limit - cost, 0)
                end
                if c > 0 then
                    reset = 2 * window_us - elapsed
                elseif p > 0 then
                    reset = window_us - elapsed
                end
                return {0, 0, 0, count, retry, reset}
            end
            if w == idx and not garbage then
                -- Same window: its expiry, set by its first charge, is already its end.
                c = call('HINCRBY', key, 'c', cost)
            else
                if garbage then call('DEL', key) end
                c = c + cost
                call('HSET', key, 'w', idx, 'c', c, 'p', p)
                call('PEXPIRE', key, ceil((2 * window_us - elapsed) / 1000))
            end
            local reset = 0
            if c > 0 then
                reset = 2 * window_us - elapsed
            elseif p > 0 then
                reset = window_us - elapsed
            end
            return {1, cost, 1, count + cost, 0, reset}
        elseif kind == 'c' then
            -- The period holding `now`: usually the one between b1 and b2 (the caller's
            -- today); b0 and b3 are read only when Redis's clock is elsewhere.
            local start, finish
            local b1, b2 = tonumber(ARGV[7]), tonumber(ARGV[8])
            if now < b1 then
                if now < tonumber(ARGV[6]) then
                    return redis.error_reply('ERR calendar boundaries do not hold the server time')
                end
                start, finish = ARGV[6], b1
            elseif now < b2 then
                start, finish = ARGV[7], b2
            else
                finish = tonumber(ARGV[9])
                if now >= finish then
                    return redis.error_reply('ERR calendar boundaries do not hold the server time')
                end
                start = ARGV[8]
            end
            local got = pcall('HMGET', key, 's', 'c')
            local garbage = false
            if got.err then
                got, garbage = {}, true
            end
            local count = 0
            if got[1] == start then
                local v = got[2]
                if v and #v <= 16 and match(v, '^%d+$') then count = tonumber(v) end
                if count > MAX_COUNT then count = 0 end
            end
            if limit - count < cost then
                return {0, 0, 0, count, finish - now, finish - now}
            end
            if garbage then call('DEL', key) end
            if got[1] == start then
                -- This period's expiry was set by its first charge: its end.
                count = call('HINCRBY', key, 'c', cost)
            else
                call('HSET', key, 's', start, 'c', cost)
                count = cost
                call('PEXPIRE', key, ceil((finish - now) / 1000))
            end
            if count < 0 then count = 0 end
            return {1, cost, 1, count, 0, finish - now}
        end
    end
end

-- Where each limit's arguments start; the limit charged first (see above); the clock.
local at = {}
local last_fixed = 0
local clock = false
local b = 4
for i = 1, nkeys do
    at[i] = b
    local kind = ARGV[b]
    if kind == 'f' then
        last_fixed = i
        b = b + 3
    elseif kind == 'c' then
        clock = true
        b = b + 6
    elseif kind == 's' or kind == 'g' then
        clock = true
        b = b + 3
    else
        return redis.error_reply('ERR unknown rate-limit kind ' .. tostring(kind))
    end
end
if mode ~= 'c' or cost == 0 then
    last_fixed = 0
end

local now = 0
if ARGV[1] ~= '' then
    now = tonumber(ARGV[1])
elseif clock then
    local t = call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A count this script stores: digits only, at most 2^53 - 1; anything else reads as 0.
-- (Inlined where used: v and #v <= 16 and match(v, '^%d+$') and tonumber(v) <= MAX_COUNT.)

-- Per limit i, from o = 10 * (i - 1): S[o+1] cap (units allowed now), S[o+2] count,
-- S[o+3] reset_us, S[o+4] garbage (or, for the limit charged first, 'done' / 'refused'),
-- S[o+5] limit (the burst for gcra), S[o+6] window_ms (f), window_us (s), T_us (g), the
-- period's end (c), S[o+7..10] the algorithm's own:
--   f: ttl_ms        s: idx, c, p, whether the state is this window's
--   g: tat           c: the period's start (as sent), the stored start
local S
if nkeys == 1 then
    S = {0, 0, 0, false, 0, 0, false, false, false, false}
else
    S = {0, 0, 0, false, 0, 0, false, false, false, false,
         0, 0, 0, false, 0, 0, false, false, false, false,
         0, 0, 0, false, 0, 0, false, false, false, false}
end
local least = nil
for j = 1, nkeys do
    -- The limit charged first is read last.
    local i = j
    if last_fixed > 0 and j >= last_fixed then
        i = (j == nkeys) and last_fixed or j + 1
    end
    local key, a = KEYS[i], at[i]
    local kind = ARGV[a]
    local limit = tonumber(ARGV[a + 1])
    local o = 10 * (i - 1)
    local cap, count, reset, garbage = 0, 0, 0, false
    if kind == 'f' then
        local window_ms = tonumber(ARGV[a + 2])
        local ttl_ms = 0
        if i == last_fixed and (least == nil or least >= cost) and cost <= limit then
            -- Every other limit allows: charge first, take it back if this one refuses.
            local n = pcall('INCRBY', key, ARGV[2])
            local before = -1
            if type(n) == 'number' then before = n - cost end
            if before < 0 or before > MAX_COUNT then
                -- Not a count of ours (another type, a non-integer, out of range): a
                -- fresh window holding this charge.
                call('SET', key, ARGV[2], 'PX', window_ms)
                cap, count, ttl_ms, garbage = limit, cost, window_ms, 'done'
            elseif before == 0 then
                call('PEXPIRE', key, window_ms)
                cap, count, ttl_ms, garbage = limit, n, window_ms, 'done'
            else
                ttl_ms = call('PTTL', key)
                if ttl_ms < 0 or ttl_ms > window_ms then
                    call('PEXPIRE', key, window_ms)
                    ttl_ms = window_ms
                end
                cap = limit - before
                if n > limit then
                    call('DECRBY', key, ARGV[2])
                    count, garbage = before, 'refused'
                else
                    count, garbage = n, 'done'
                end
            end
        else
            local got = pcall('GET', key)
            if type(got) == 'table' then
                garbage = true
            elseif got then
                if #got <= 16 and match(got, '^%d+$') then
                    count = tonumber(got)
                    if count > MAX_COUNT then count, garbage = 0, true end
                else
                    garbage = true
                end
            end
            if count > 0 then
                ttl_ms = call('PTTL', key)
                if ttl_ms < 0 or ttl_ms > window_ms then
                    -- No expiry, or one after the window's end: give it the window's.
                    call('PEXPIRE', key, window_ms)
                    ttl_ms = window_ms
                end
            end
            cap = limit - count
        end
        reset = ttl_ms * 1000
        S[o + 6], S[o + 7] = window_ms, ttl_ms
    elseif kind == 's' then
        local window_us = tonumber(ARGV[a + 2])
        local idx = floor(now / window_us)
        local elapsed = now - idx * window_us
        local got = pcall('HMGET', key, 'w', 'c', 'p')
        if got.err then
            got, garbage = {}, true
        end
        local w = tonumber(got[1])
        local c, p = 0, 0
        local v
        if w == idx then
            v = got[2]
            if v and #v <= 16 and match(v, '^%d+$') then c = tonumber(v) end
            if c > MAX_COUNT then c = 0 end
            v = got[3]
            if v and #v <= 16 and match(v, '^%d+$') then p = tonumber(v) end
            if p > MAX_COUNT then p = 0 end
        elseif w == idx - 1 then
            v = got[2]
            if v and #v <= 16 and match(v, '^%d+$') then p = tonumber(v) end
            if p > MAX_COUNT then p = 0 end
        end
        -- The estimate: the previous window's count weighted by its share still in the
        -- sliding window, rounded down, plus this window's.
        count = floor(p * (window_us - elapsed) / window_us) + c
        if c > 0 then
            reset = 2 * window_us - elapsed
        elseif p > 0 then
            reset = window_us - elapsed
        end
        cap = limit - count
        S[o + 6], S[o + 7], S[o + 8], S[o + 9], S[o + 10] = window_us, idx, c, p, w == idx
    elseif kind == 'g' then
        local t_us = tonumber(ARGV[a + 2])
        local got = pcall('GET', key)
        local tat = now
        if type(got) == 'table' then
            garbage = true
        elseif got then
            local stored = tonumber(got)
            if stored == nil or not match(got, '^%d+$') then
                garbage = true
            elseif stored > now + limit * t_us then
                -- Further ahead than any charge can put it: not ours.
                garbage = true
            elseif stored > now then
                tat = stored
            end
        end
        count = ceil((tat - now) / t_us)
        reset = tat - now
        cap = limit - count
        S[o + 6], S[o + 7] = t_us, tat
    else
        -- The period holding `now`: usually the one between b1 and b2 (the caller's
        -- today); b0 and b3 are read only when Redis's clock is elsewhere.
        local start, finish
        local b1, b2 = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
        if now < b1 then
            if now < tonumber(ARGV[a + 2]) then
                return redis.error_reply('ERR calendar boundaries do not hold the server time')
            end
            start, finish = ARGV[a + 2], b1
        elseif now < b2 then
            start, finish = ARGV[a + 3], b2
        else
            finish = tonumber(ARGV[a + 5])
            if now >= finish then
                return redis.error_reply('ERR calendar boundaries do not hold the server time')
            end
            start = ARGV[a + 4]
        end
        local got = pcall('HMGET', key, 's', 'c')
        if got.err then
            got, garbage = {}, true
        end
        if got[1] == start then
            local v = got[2]
            if v and #v <= 16 and match(v, '^%d+$') then count = tonumber(v) end
            if count > MAX_COUNT then count = 0 end
        end
        reset = finish - now
        cap = limit - count
        S[o + 6], S[o + 7], S[o + 8] = finish, start, got[1]
    end
    S[o + 1], S[o + 2], S[o + 3], S[o + 4], S[o + 5] = cap, count, reset, garbage, limit
    if least == nil or cap < least then
        least = cap
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
    granted = least
    if granted > cost then granted = cost end
    if granted <= 0 then granted, allowed = 0, 0 end
else
    granted = cost
end

-- Sized once (its slots are all overwritten below): growing it costs a rehash per doubling.
local reply = {allowed, granted, unpack(S, 1, 4 * nkeys)}
local r = 2
for i = 1, nkeys do
    local key = KEYS[i]
    local kind = ARGV[at[i]]
    local o = 10 * (i - 1)
    local cap, count, reset, garbage, limit = S[o + 1], S[o + 2], S[o + 3], S[o + 4], S[o + 5]
    local ok, retry = 1, 0
    local refusing = mode ~= 'r' and cap < want
    if kind == 'f' then
        if refusing then
            ok, retry = 0, S[o + 7] * 1000
        end
        if garbage == 'done' or garbage == 'refused' then
            -- Charged first (and taken back if refused): figures as they are.
        elseif granted > 0 then
            if mode == 'r' then
                if count > 0 then
                    local k = granted
                    if k > count then k = count end
                    count = call('DECRBY', key, k)
                end
            else
                if garbage then call('DEL', key) end
                local n = call('INCRBY', key, granted)
                if n == granted then
                    call('PEXPIRE', key, S[o + 6])
                    reset = S[o + 6] * 1000
                end
                count = n
            end
        end
    elseif kind == 's' then
        local window_us, idx, c, p, current = S[o + 6], S[o + 7], S[o + 8], S[o + 9], S[o + 10]
        local elapsed = now - idx * window_us
        if refusing then
            ok = 0
            if c + want <= limit then
                retry = sliding_wait(window_us, p, limit - c - want, elapsed) - elapsed
            else
                -- Not in this window: from the next, whose previous count is this one's.
                retry = window_us - elapsed + sliding_wait(window_us, c, limit - want, 0)
            end
        end
        if granted > 0 then
            if mode == 'r' then
                local from_c = granted
                if from_c > c then from_c = c end
                local from_p = granted - from_c
                if from_p > p then from_p = p end
                if from_c + from_p > 0 then
                    c = c - from_c
                    p = p - from_p
                    if current then
                        call('HSET', key, 'c', c, 'p', p)
                    else
                        -- Stored as of the previous window (its c is our p): keep it so,
                        -- and keep its expiry, which ends when p stops mattering.
                        call('HSET', key, 'c', p)
                    end
                end
                count = floor(p * (window_us - elapsed) / window_us) + c
            else
                if current and not garbage then
                    -- Same window: its expiry, set by its first charge, is already its end.
                    c = call('HINCRBY', key, 'c', granted)
                else
                    if garbage then call('DEL', key) end
                    c = c + granted
                    call('HSET', key, 'w', idx, 'c', c, 'p', p)
                    call('PEXPIRE', key, ceil((2 * window_us - elapsed) / 1000))
                end
                count = count + granted
            end
            if c > 0 then
                reset = 2 * window_us - elapsed
            elseif p > 0 then
                reset = window_us - elapsed
            else
                reset = 0
            end
        end
    elseif kind == 'g' then
        local t_us, tat = S[o + 6], S[o + 7]
        if refusing then
            ok, retry = 0, tat - now + want * t_us - limit * t_us
            if retry < 0 then retry = 0 end
        end
        if granted > 0 then
            if mode == 'r' then
                if tat > now then
                    tat = tat - granted * t_us
                    if tat <= now then
                        tat = now
                        call('DEL', key)
                    else
                        call('SET', key, tat, 'KEEPTTL')
                    end
                end
            else
                tat = tat + granted * t_us
                call('SET', key, tat, 'PX', ceil((tat - now) / 1000))
            end
            count = ceil((tat - now) / t_us)
            reset = tat - now
        end
    else
        local finish = S[o + 6]
        if refusing then
            ok, retry = 0, finish - now
        end
        if granted > 0 then
            if mode == 'r' then
                if count > 0 then
                    local k = granted
                    if k > count then k = count end
                    count = call('HINCRBY', key, 'c', -k)
                end
            else
                if garbage then call('DEL', key) end
                local start = S[o + 7]
                if S[o + 8] == start then
                    -- This period's expiry was set by its first charge: its end.
                    count = call('HINCRBY', key, 'c', granted)
                else
                    call('HSET', key, 's', start, 'c', granted)
                    count = granted
                    call('PEXPIRE', key, ceil((finish - now) / 1000))
                end
            end
        end
    end
    if count < 0 then count = 0 end
    if nkeys == 1 then
        return {allowed, granted, ok, count, retry, reset}
    end
    reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4] = ok, count, retry, reset
    r = r + 4
end
return reply
