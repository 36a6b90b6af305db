-- delete_if_equals.lua: delete a key only if it still holds what the caller saw.
--
-- Used to evict a value that failed to decode (a reader must not delete a good value
-- another client wrote in the meantime) and to release a lease (only its holder may).
--
-- KEYS[1]  the key
-- ARGV[1]  mode: "value" deletes the key if it is a string equal to ARGV[2];
--          "wrongtype" deletes it if it holds anything but a string
-- ARGV[2]  the exact bytes expected at the key (mode "value"; may be empty)
--
-- Reply: 1 if the key was deleted, 0 otherwise
local kind = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] == 'wrongtype' then
    if kind ~= 'string' and kind ~= 'none' then
        return redis.call('DEL', KEYS[1])
    end
    return 0
end
if kind == 'string' and redis.call('GET', KEYS[1]) == ARGV[2] then
    return redis.call('DEL', KEYS[1])
end
return 0
