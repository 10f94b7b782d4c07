#!/usr/bin/env python3
"""An HTTP proxy in front of Azurite that injects the faults a real network and service
produce, for the fuse-tests.

    fault_proxy.py LISTEN_PORT TARGET_PORT RULES_JSON LOG

Every request is forwarded on its own upstream connection, and every answer closes the
client's connection (`Connection: close`), so faults are exact per request. RULES_JSON is
read again whenever it changes:

    {"rules": [{"method": "PUT", "path": "ckpt", "fault": "reset_after", "times": 1}],
     "rates": {"503": 0.05, "reset_before": 0.02, "reset_after": 0.02, "truncate": 0.02},
     "delay_ms": [0, 20], "seed": 7}

Faults: "503" (answered here with an Azure ServerBusy error body, never forwarded; with
"retry_after": N in the rules, with Retry-After: N),
"reset_before" (the connection is reset, the service never sees the request),
"reset_after" (the service carries the request out; its answer is lost to a reset),
"truncate" (the answer's headers and half its body, then a reset), "hang" (the request is
held until the rules change; a frozen service), "delay:MS". With "log_all": true every
request is logged ("pass" when no fault was injected). A rule matches a method and a
path substring and fires `times` times (default: always) after `skip` matches; rates apply
to requests no rule matched. Each injected fault is a line in LOG.
"""
import asyncio
import json
import os
import random
import socket
import struct
import sys
import time

listen_port, target_port, rules_path, log_path = (
    int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
state = {"mtime": None, "cfg": {}, "fired": {}, "seen": {}, "rng": random.Random(0)}
log = open(log_path, "a", buffering=1)


def config():
    try:
        m = os.stat(rules_path).st_mtime_ns
    except OSError:
        return {}
    if m != state["mtime"]:
        try:
            with open(rules_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return state["cfg"]
        state.update(mtime=m, cfg=cfg, fired={}, seen={},
                     rng=random.Random(cfg.get("seed", 0)))
    return state["cfg"]


def choose(method, path):
    cfg = config()
    for i, r in enumerate(cfg.get("rules", [])):
        if r.get("method", method) != method or r.get("path", "") not in path:
            continue
        seen = state["seen"].get(i, 0)
        state["seen"][i] = seen + 1
        if seen < r.get("skip", 0):
            continue
        fired = state["fired"].get(i, 0)
        if fired >= r.get("times", 1 << 60):
            continue
        state["fired"][i] = fired + 1
        return r["fault"]
    rng = state["rng"]
    for fault, p in cfg.get("rates", {}).items():
        if rng.random() < p:
            return fault
    lo, hi = cfg.get("delay_ms", [0, 0])
    return f"delay:{rng.uniform(lo, hi)}" if hi > 0 else None


def reset(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    kept = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        name = line.split(":", 1)[0].strip().lower()
        if name == "content-length":
            length = int(line.split(":", 1)[1])
        if name in ("connection", "keep-alive"):
            continue
        kept.append(line)
    body = await reader.readexactly(length) if length else b""
    kept.append("Connection: close")
    return method, path, ("\r\n".join(kept) + "\r\n\r\n").encode("latin-1") + body, length


async def forward(request):
    r, w = await asyncio.open_connection("127.0.0.1", target_port)
    w.write(request)
    await w.drain()
    answer = await r.read()  # the upstream closes after one answer
    w.close()
    return answer


def closing(answer):
    head, sep, body = answer.partition(b"\r\n\r\n")
    lines = [l for l in head.split(b"\r\n")
             if not l.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join(lines + [b"Connection: close"]) + sep + body, len(head) + len(sep)


BUSY = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
        b"<Message>injected by fault_proxy</Message></Error>")


async def handle(reader, writer):
    try:
        method, path, request, sent = await read_request(reader)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        writer.close()
        return
    fault = choose(method, path)
    # The body's length (`sent`) ends the line: what a request carried.
    if fault and not fault.startswith("delay:"):
        log.write(f"{time.time():.3f} {fault} {method} {path} bytes={sent}\n")
    elif state["cfg"].get("log_all"):
        log.write(f"{time.time():.3f} pass {method} {path} bytes={sent}\n")
    try:
        if fault == "hang":
            mtime = state["mtime"]
            while state["mtime"] == mtime:
                await asyncio.sleep(0.05)
                config()
            fault = None
        if fault and fault.startswith("delay:"):
            await asyncio.sleep(float(fault[6:]) / 1000)
            fault = None
        if fault == "503":
            # "retry_after": N in the rules adds Retry-After: N (seconds), as Azure may.
            after = state["cfg"].get("retry_after")
            extra = b"Retry-After: %d\r\n" % int(after) if after is not None else b""
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                         b"x-ms-error-code: ServerBusy\r\nContent-Length: %d\r\n" % len(BUSY)
                         + extra + b"Connection: close\r\n\r\n" + BUSY)
            await writer.drain()
            writer.close()
            return
        if fault == "reset_before":
            reset(writer)
            return
        answer, head_len = closing(await forward(request))
        if fault == "reset_after":
            reset(writer)
            return
        if fault == "truncate":
            writer.write(answer[: head_len + (len(answer) - head_len) // 2])
            await writer.drain()
            reset(writer)
            return
        writer.write(answer)
        await writer.drain()
        writer.close()
    except (ConnectionError, OSError):
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
