#!/usr/bin/env python3
"""A TCP proxy that adds a fixed round trip: each byte is forwarded half the RTT late in
each direction, so every request-response pays one RTT while throughput is not limited
(chunks are queued with their arrival time, not forwarded one after another).

    delay_proxy.py LISTEN_PORT TARGET_PORT [RTT_MS]     # on 127.0.0.1

Models Azure's in-region round trip (about 5 ms) in front of Azurite on loopback.

With DELAY_PROXY_COUNTS=FILE it also counts the requests it forwards, by method, and keeps
FILE up to date as JSON ({"PUT": 12, "GET": 3, ...}), at most `FLUSH` seconds behind: the
request count of a workload is the difference of two readings taken `FLUSH` after it. Request
lines are found in the client's bytes; a body that happened to hold one would be counted
too, which a benchmark's data does not. (Rewriting FILE on every request cost half of this
proxy's CPU, about 1 CPU-s for a pip install's 3,400 requests, on the CPUs the benchmark
measures; now it is rewritten at most 20 times a second.)
"""
import asyncio
import json
import os
import re
import sys
import time

COUNTS_FILE = os.environ.get("DELAY_PROXY_COUNTS")
REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|DELETE|POST) /[^ \r\n]* HTTP/1\.1\r\n")
FLUSH = 0.05
counts = {}
flush_due = False


def write_counts():
    global flush_due
    flush_due = False
    tmp = COUNTS_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(counts, f)
    os.replace(tmp, COUNTS_FILE)


def count(tail, chunk):
    """Counts the request lines in `chunk` (with `tail`, the end of the previous chunk, so a
    line cut in two is seen once); returns the new tail."""
    data = tail + chunk
    found = list(REQUEST_LINE.finditer(data))
    for m in found:
        if m.end() > len(tail):
            counts[m.group(1).decode()] = counts.get(m.group(1).decode(), 0) + 1
    global flush_due
    if found and COUNTS_FILE and not flush_due:
        flush_due = True
        asyncio.get_running_loop().call_later(FLUSH, write_counts)
    return data[-200:]


async def pipe(reader, writer, delay, counting=False):
    queue = asyncio.Queue()
    tail = b""

    async def forward():
        while True:
            due, chunk = await queue.get()
            if chunk is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(forward())
    try:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            if counting and COUNTS_FILE:
                tail = count(tail, chunk)
            await queue.put((time.monotonic() + delay, chunk))
    except (ConnectionError, OSError):
        pass
    await queue.put((0, None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def main():
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    half = (float(sys.argv[3]) if len(sys.argv) > 3 else 5.0) / 2000.0

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            pipe(client_r, server_w, half, counting=True), pipe(server_r, client_w, half)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
