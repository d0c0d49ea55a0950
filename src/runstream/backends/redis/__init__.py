"""The Redis engine (``redis://``, ``rediss://``): Redis Streams for many servers and workers.

Its parts: the event log (:mod:`.log`, with its Lua scripts in :mod:`.lua`),
the run store (:mod:`.runstore`), the run queue, workers and janitor
(:mod:`.dispatch`), one error map (:mod:`.errors`) and one pub/sub listener per
process (:mod:`.pubsub`). Needs the ``redis`` extra.
"""

from __future__ import annotations

from runstream.backends.engine import Engine
from runstream.backends.redis.dispatch import new_worker, start_dispatch
from runstream.backends.redis.durable import RedisDurableStore
from runstream.backends.redis.log import RedisEventLog, RedisOptions, parse_url
from runstream.backends.redis.runstore import RedisRunStore

__all__ = ["ENGINE", "RedisEventLog", "RedisOptions", "RedisRunStore", "parse_url"]

ENGINE = Engine(
    name="redis",
    open_log=RedisEventLog.from_url,
    open_run_store=RedisRunStore.from_url,
    start_dispatch=start_dispatch,
    new_worker=new_worker,
    open_durable=RedisDurableStore.for_log,
)
