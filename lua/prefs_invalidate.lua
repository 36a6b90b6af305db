-- prefs_invalidate.lua: drop a client's cached preferences, leaving a short tombstone.
--
-- A plain DEL would let a slow reader (missed, read the old row, then got delayed) write
-- the old row back after the update. The tombstone carries the version the row is now at
-- (at least), so prefs_set.lua refuses anything older while it lives.
--
-- KEYS[1]  preference key, crm:prefs:<client_id>
-- ARGV[1]  the row's new version (integer, 0 <= V <= 2^53 - 1), or "" when the caller
--          does not know it
-- ARGV[2]  time to live of the tombstone, in milliseconds (> 0)
--
-- Tombstone version chosen:
--   known version V     max(V, version already cached or tombstoned)
--   unknown version     (version cached or tombstoned) + 1, since the row moved on at
--                       least one step, but at most 2^53 - 1; a bare "T" (refuse all)
--                       when nothing is known
-- A stored version is at most 16 decimal digits and at most 2^53 - 1 (exact in Lua's
-- numbers); a value or tombstone with any other version is garbage: nothing is known.
--
-- Reply: the tombstone version written, or -2 for a bare tombstone
local ttl_ms = tonumber(ARGV[2])
local MAX_VERSION = 9007199254740991

-- The version a string holds: nil unless it is at most 16 decimal digits, at most
-- 2^53 - 1 (see above).
local function parse_version(s)
    if not s or #s > 16 or not string.match(s, '^%d+$') then
        return nil
    end
    local v = tonumber(s)
    if v > MAX_VERSION then
        return nil
    end
    return v
end

local known = nil
if ARGV[1] ~= '' then
    known = parse_version(ARGV[1])
    if not known then
        return redis.error_reply('ERR version must be an integer in [0, 2^53 - 1] or empty')
    end
end

local current = redis.pcall('GET', KEYS[1])
-- A value of the wrong type is overwritten below; any other refusal (NOPERM ...) must not
-- be mistaken for an empty key, which would skip the version check.
if type(current) == 'table' and current.err and not string.find(current.err, 'WRONGTYPE', 1, true) then
    return redis.error_reply(current.err)
end
local current_version = nil
local bare = false

if type(current) == 'string' then
    local tomb = string.match(current, '^T(%d*)$')
    if tomb == '' then
        bare = true
    elseif tomb then
        current_version = parse_version(tomb)
    else
        current_version = parse_version(string.match(current, '^(%d+):'))
    end
end

local new_version = nil
if known then
    new_version = known
    if current_version and current_version > new_version then
        new_version = current_version
    end
elseif current_version and not bare then
    new_version = math.min(current_version + 1, MAX_VERSION)
end

if new_version then
    redis.call('SET', KEYS[1], 'T' .. string.format('%d', new_version), 'PX', ttl_ms)
    return new_version
end
redis.call('SET', KEYS[1], 'T', 'PX', ttl_ms)
return -2
