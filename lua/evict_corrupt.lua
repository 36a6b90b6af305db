-- evict_corrupt.lua: delete a value that failed to decode, but only that value.
--
-- A reader that found garbage must not delete a good value another client wrote in the
-- meantime, so the delete happens only if the key still holds exactly what was read.
--
-- KEYS[1]  the key that held the bad value
-- ARGV[1]  the exact bytes that failed to decode, or "" when the read hit a value of the
--          wrong type (then any non-string value is deleted)
--
-- Reply: 1 if the key was deleted, 0 otherwise
local kind = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] == '' then
    if kind ~= 'string' and kind ~= 'none' then
        return redis.call('DEL', KEYS[1])
    end
    return 0
end
if kind == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
