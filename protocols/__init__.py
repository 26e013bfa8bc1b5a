"""Protocol-aware plugins for vaurien: http, redis, memcache, mysql, smtp."""
