-- prefs_set.lua: store a client's preferences only if they are not older than what is cached.
--
-- KEYS[1]  preference key, crm:prefs:<client_id>
-- ARGV[1]  version of the row being written (integer, 0 <= version <= 2^53 - 1)
-- ARGV[2]  the value to store: "<version>:<json>" (see crmcache._codec)
-- ARGV[3]  time to live of the value, in milliseconds (> 0)
--
-- The key holds either a value "<version>:<json>", a tombstone "T<version>" left by an
-- invalidation (the row is now at least at <version>), or a bare tombstone "T" (an
-- invalidation whose version was unknown: refuse every write until it expires).
-- A version is at most 16 decimal digits and at most 2^53 - 1 (exact in Lua's numbers);
-- a value or tombstone with any other version is garbage, overwritten like anything else.
--
-- Reply: {stored, current_version}
--   stored           1 if the value was written, 0 if it was refused as stale
--   current_version  version found before the write; -1 when the key was empty,
--                    unreadable or held something else (garbage), -2 for a bare tombstone
local ttl_ms = tonumber(ARGV[3])
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

local version = parse_version(ARGV[1])
if not version then
    return redis.error_reply('ERR version must be an integer in [0, 2^53 - 1]')
end

local current = redis.pcall('GET', KEYS[1])
local current_version = -1
-- A value of the wrong type is overwritten below; any other refusal (NOPERM ...) must not
-- be mistaken for an empty key, which would skip the version check.
if type(current) == 'table' and current.err and not string.find(current.err, 'WRONGTYPE', 1, true) then
    return redis.error_reply(current.err)
end

-- Only a string can carry a version; a wrong-type value or garbage is overwritten.
if type(current) == 'string' then
    local tomb = string.match(current, '^T(%d*)$')
    if tomb == '' then
        return {0, -2}
    elseif tomb then
        current_version = parse_version(tomb) or -1
    else
        current_version = parse_version(string.match(current, '^(%d+):')) or -1
    end
end

-- Equal versions are the same row: accept, which refreshes the TTL.
if version < current_version then
    return {0, current_version}
end

redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl_ms)
return {1, current_version}
