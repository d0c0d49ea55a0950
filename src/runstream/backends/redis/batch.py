"""Concurrent appends coalesced into one pipelined round trip.

Every append is one run of the append script (entry, metadata, producer
check: atomic per stream). Sent one by one, each costs a round trip and
redis-py's per-command overhead. :class:`AppendBatcher` sends an append at
once when no other is in flight; appends that arrive while one is (from other
requests, to any streams) wait for it and then go together as one pipeline of
``EVALSHA`` calls. An idle server adds no latency; a busy one makes one round
trip per batch instead of one per append.

What stays exact:

* **Ack after the write.** A caller is answered with its own script's reply,
  after Redis ran it; each script is still atomic on its own, and a failed one
  fails only its caller.
* **Idempotent producers.** A pipeline keeps submission order, so two appends
  of one producer in one batch run in the order they were made; each script
  checks its producer's seq as before.
* **Unknown script.** After a Redis restart or ``SCRIPT FLUSH`` the pipeline's
  ``EVALSHA`` fail with ``NOSCRIPT`` without running anything; those appends
  are sent again through the script object, which loads it.

Redis Cluster keeps one script call per append (its pipelines split by slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from runstream.backends.redis.errors import translated

__all__ = ["AppendBatcher"]

_Call = tuple[Sequence[str], Sequence[bytes], "asyncio.Future[Any]"]


class AppendBatcher:
    """Runs the append script for concurrent callers, batching while a round trip is out."""

    def __init__(
        self,
        redis: Redis,
        script: AsyncScript,
        op: Callable[[str], AbstractAsyncContextManager[None]],
    ) -> None:
        self._redis = redis
        self._script = script
        self._op = op
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        self.round_trips = 0
        """Round trips made (a pipeline counts once)."""
        self.appends = 0

    async def run(self, keys: Sequence[str], args: Sequence[bytes]) -> Any:
        """The script's reply for ``keys``/``args``; raises a runstream error on failure."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, fut))
        if self._sender is None:
            # Nothing in flight: this append goes at once, on its own. The sender is a
            # task of its own: a caller that is cancelled (its client left) does not
            # stop the others' round trip.
            self._sender = loop.create_task(self._drain(), name="runstream-redis-appends")
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._sender = None
            for _, _, fut in self._queue:  # only if cancelled (shutdown)
                if not fut.done():
                    fut.cancel()
            self._queue = []

    async def _send(self, batch: list[_Call]) -> None:
        self.round_trips += 1
        self.appends += len(batch)
        if len(batch) == 1:
            keys, args, fut = batch[0]
            await self._one(keys, args, fut)
            return
        try:
            async with self._op("append"):
                pipe = self._redis.pipeline(transaction=False)
                sha = self._script.sha
                for keys, args, _ in batch:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the round trip failed: every caller gets the error
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        unknown: list[_Call] = []
        for call, reply in zip(batch, replies, strict=True):
            fut = call[2]
            if fut.done():
                continue
            if isinstance(reply, NoScriptError):
                unknown.append(call)
            elif isinstance(reply, Exception):
                fut.set_exception(_translate(reply))
            else:
                fut.set_result(reply)
        for keys, args, fut in unknown:  # nothing ran for these: safe to send again
            await self._one(keys, args, fut)

    async def _one(
        self, keys: Sequence[str], args: Sequence[bytes], fut: asyncio.Future[Any]
    ) -> None:
        try:
            async with self._op("append"):
                reply = await self._script(keys=keys, args=args)
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(reply)


def _translate(exc: Exception) -> Exception:
    """The runstream error a Redis error reply maps to (as :func:`translated` raises it)."""
    try:
        with translated("append"):
            raise exc
    except Exception as error:
        return error
