"""State shared by every process and replica through Redis (`server.redis_url`), and what stands in when it is not.

`redis` is the connection and its health (down: everything falls back to per-process state, said in /status and
the log; back: shared again), `peers` each replica's recent health for
/status, `ratelimit` the request rates that belong to a credential (Notion's 3 a second) rather than to a process.
The breakers every replica sees (`aggregator.retrieval.shared_breaker`) and the response cache
(`aggregator.retrieval.cache`) keep their state here too. redis-py is an optional extra, imported lazily.
"""
