"""Micro-benchmark of the SSE codec; prints one JSON object.

    .venv/bin/python bench/sse_codec.py [--events N]

``encode_events_per_s``: :func:`encode_event` on the server's common case (an
``epoch:offset`` id, a type and one line of compact JSON, ~120 bytes).
``decode_mb_per_s``: :class:`SSEDecoder` over a body of such frames fed in
64 KiB chunks (and in 1 KiB chunks, closer to a trickling stream).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

from runstream.protocol.sse import SSEDecoder, encode_event


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n: int = args.events

    payloads = [
        json.dumps({"line": f"step {i}: processed batch of records ok"}, separators=(",", ":"))
        for i in range(n)
    ]
    ids = [f"k3v9q2:{i}" for i in range(n)]

    def encode_common() -> list[bytes]:
        return [encode_event(p, event="stdout", id=i) for p, i in zip(payloads, ids, strict=True)]

    multiline = ["line one\nline two\r\nline three"] * n

    def encode_multiline() -> list[bytes]:
        return [encode_event(p, event="log") for p in multiline]

    frames = encode_common()
    body = b"".join(frames)

    def decode(chunk_size: int) -> Callable[[], object]:
        chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]

        def run() -> int:
            decoder = SSEDecoder()
            count = 0
            for chunk in chunks:
                count += len(decoder.feed(chunk))
            assert count == n
            return count

        return run

    t_enc = best_of(args.repeat, encode_common)
    t_enc_multi = best_of(args.repeat, encode_multiline)
    t_dec = best_of(args.repeat, decode(64 * 1024))
    t_dec_small = best_of(args.repeat, decode(1024))
    mb = len(body) / 1e6
    print(
        json.dumps(
            {
                "benchmark": "sse_codec",
                "python": platform.python_version(),
                "events": n,
                "frame_bytes_avg": round(len(body) / n, 1),
                "encode_events_per_s": round(n / t_enc),
                "encode_multiline_events_per_s": round(n / t_enc_multi),
                "decode_mb_per_s": round(mb / t_dec, 1),
                "decode_events_per_s": round(n / t_dec),
                "decode_1k_chunks_mb_per_s": round(mb / t_dec_small, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
