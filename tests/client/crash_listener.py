"""A listener process for the crash test: handlers with a durable checkpoint, until the end.

Usage: ``python crash_listener.py URL STREAM STORE_KIND STORE_PATH LOG_PATH RUN_TAG``.

Each handled event appends one line ``RUN_TAG ID IDEMPOTENCY_KEY`` to LOG_PATH
with a single ``write(2)`` on an ``O_APPEND`` file: the handler's side effect,
which a ``kill -9`` cannot tear or lose once the call returned. Every 50
handled events it prints ``handled N`` on stdout so the test knows how far it
got. Exits 0 after the stream's end event was handled.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

from runstream import (
    AsyncClient,
    CheckpointStore,
    Context,
    Event,
    FileCheckpointStore,
    SQLiteCheckpointStore,
)

CONCURRENCY = 4
QUEUE_SIZE = 32


async def main(url: str, stream: str, kind: str, store_path: str, log_path: str, tag: str) -> int:
    store: CheckpointStore = (
        SQLiteCheckpointStore(store_path) if kind == "sqlite" else FileCheckpointStore(store_path)
    )
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    handled = 0
    rng = random.Random()
    async with AsyncClient(url) as client:

        @client.on()
        async def handle(event: Event, ctx: Context) -> None:
            nonlocal handled
            # Handlers finish out of order, as real ones do.
            await asyncio.sleep(rng.uniform(0, 0.002))
            os.write(fd, f"{tag} {event.id} {ctx.idempotency_key(event)}\n".encode())
            handled += 1
            if handled % 50 == 0:
                print(f"handled {handled}", flush=True)

        end = await client.run_forever(
            stream,
            checkpoint=store,
            concurrency=CONCURRENCY,
            queue_size=QUEUE_SIZE,
        )
    os.close(fd)
    print(f"end {end.id if end else None}", flush=True)
    return 0 if end is not None else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:7])))
