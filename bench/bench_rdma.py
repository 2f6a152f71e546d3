"""Benchmark of the rdma providers: one-sided WRITE latency (p50/p99, write-to-completion) and
throughput at 64 B, 4 KiB and 64 KiB, beside a plain TCP ping-pong on loopback measured in the
same run. The peer is a separate process. Prints a table, writes bench/results/rdma.json.

The network transports are sampled alternately (plain TCP, tcp, verbs, plain TCP, ...). This
machine's loopback latency swings by 4x within seconds, so besides the ratio of the two p50s the
benchmark reports the median of per-sample ratios (each tcp write against the plain round trip
measured just before it), which compares like with like; the 1.5x target is checked on that.

    .venv/bin/python bench/bench_rdma.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rdma import Access, Listener, connect, open_context, rdma_devices  # noqa: E402

SIZES = [64, 4096, 65536]
SECRET = b"bench-secret"
REGION = 1 << 20
ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ
ACK = 32  # a one-sided write's acknowledgement is a header; the ping-pong answers with as much


# -- peer side -----------------------------------------------------------------------------------
def run_peer(provider: str) -> None:
    ctx = open_context(provider)
    pd = ctx.alloc_pd()
    cq = ctx.create_cq()
    mr = pd.reg_mr(REGION, ACCESS)
    lst = Listener(ctx, pd, "127.0.0.1:0", SECRET, cq, cq, json.dumps([mr.addr, mr.length, mr.rkey]).encode())
    print(json.dumps({"endpoint": lst.endpoint}), flush=True)
    sys.stdin.read()  # idle until the benchmark closes our stdin
    lst.close()
    ctx.close()


def run_echo() -> None:
    ls = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"endpoint": f"127.0.0.1:{ls.getsockname()[1]}"}), flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    ack = bytes(ACK)
    while True:
        hdr = conn.recv(4, socket.MSG_WAITALL)
        if len(hdr) < 4:
            return
        n = int.from_bytes(hdr, "little")
        got = 0
        while got < n:
            got += conn.recv_into(view[got:n], n - got)
        conn.sendall(ack)


def spawn(*args: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = p.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"benchmark peer {args} failed to start")
    return p, json.loads(line)["endpoint"]


# -- measurements --------------------------------------------------------------------------------
def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def iterations(size: int, quick: bool) -> int:
    n = {64: 4000, 4096: 2000, 65536: 600}[size]
    return n // 4 if quick else n


class RdmaLink:
    """A provider's queue pair to a peer process, measured by write-to-completion."""

    def __init__(self, provider: str) -> None:
        self.name = provider
        self.peer, endpoint = spawn("--peer", provider)
        self.ctx = open_context(provider)
        pd = self.ctx.alloc_pd()
        self.cq = self.ctx.create_cq()
        self.mr = pd.reg_mr(REGION, ACCESS)
        conn = connect(self.ctx, pd, endpoint, SECRET, self.cq, self.cq, b"")
        self.addr, _, self.rkey = json.loads(conn.peer_private_data)
        self.qp = conn.qp

    def once(self, size: int, i: int) -> float:
        t0 = time.perf_counter_ns()
        self.qp.post_write(self.mr, 0, size, self.addr, self.rkey, i)
        wcs = self.cq.wait(5)
        t1 = time.perf_counter_ns()
        if not wcs or wcs[0].status != 0:
            raise RuntimeError(f"{self.name}: write failed: {wcs}")
        return (t1 - t0) / 1000

    def throughput(self, size: int, duration: float) -> tuple[int, float]:
        window, posted, done = 32, 0, 0
        t0 = time.perf_counter()
        end = t0 + duration
        while time.perf_counter() < end or done < posted:
            while posted - done < window and time.perf_counter() < end:
                self.qp.post_write(self.mr, 0, size, self.addr + (posted % 8) * size, self.rkey, posted)
                posted += 1
            got = self.cq.wait(5, 64)
            if any(w.status != 0 for w in got):
                raise RuntimeError(f"{self.name}: write failed in throughput run")
            done += len(got)
        return done, time.perf_counter() - t0

    def idle_cpu_pct(self) -> float:
        c0, w0 = time.process_time(), time.perf_counter()
        self.cq.wait(0.5)
        return round(100 * (time.process_time() - c0) / (time.perf_counter() - w0), 2)

    def close(self) -> None:
        self.ctx.close()
        self.peer.stdin.close()  # type: ignore[union-attr]
        self.peer.wait(10)


class PlainTcp:
    """The yardstick: send ``size`` bytes, wait for a 32-byte answer (one round trip)."""

    name = "plain_tcp"

    def __init__(self) -> None:
        self.peer, endpoint = spawn("--echo")
        host, port = endpoint.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._msgs = {n: n.to_bytes(4, "little") + bytes(n) for n in SIZES}

    def once(self, size: int, i: int) -> float:
        msg = self._msgs[size]
        t0 = time.perf_counter_ns()
        self.s.sendall(msg)
        self.s.recv(ACK, socket.MSG_WAITALL)
        return (time.perf_counter_ns() - t0) / 1000

    def throughput(self, size: int, duration: float) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            self.once(size, n)
            n += 1
        return n, time.perf_counter() - t0

    def close(self) -> None:
        self.s.close()
        self.peer.stdin.close()  # type: ignore[union-attr]
        self.peer.wait(10)


def measure(links: list, quick: bool, duration: float) -> dict:
    """Latency, then throughput. The network transports (plain TCP, tcp, verbs) are sampled
    alternately, one write each in turn, so that this machine's changing load hits them alike
    and their ratio means something; shm, a memory copy, is sampled in a loop of its own."""
    out: dict = {link.name: {} for link in links}
    alone = [link for link in links if link.name == "shm"]
    paired = [link for link in links if link.name != "shm"]
    for size in SIZES:
        lat: dict[str, list[float]] = {link.name: [] for link in links}
        for link in links:
            for i in range(50):  # warm-up
                link.once(size, i)
        for i in range(iterations(size, quick)):
            for link in paired:
                lat[link.name].append(link.once(size, i))
        for link in alone:
            lat[link.name] = [link.once(size, i) for i in range(iterations(size, quick))]
        for link in links:
            done, elapsed = link.throughput(size, duration)
            out[link.name][str(size)] = {
                "p50_us": round(statistics.median(lat[link.name]), 2),
                "p99_us": round(pct(lat[link.name], 0.99), 2),
                "ops_per_s": round(done / elapsed),
                "mb_per_s": round(done * size / elapsed / 1e6, 1),
            }
            if link in paired and link.name != "plain_tcp":
                # each sample against the plain TCP sample taken just before it: same conditions
                pairs = [x / y for x, y in zip(lat[link.name], lat["plain_tcp"], strict=True)]
                out[link.name][str(size)]["paired_ratio_p50"] = round(statistics.median(pairs), 2)
    for link in links:
        if isinstance(link, RdmaLink):
            out[link.name]["idle_wait_cpu_pct"] = link.idle_cpu_pct()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rdma.json")
    )
    args = ap.parse_args()
    if args.peer:
        return run_peer(args.peer)
    if args.echo:
        return run_echo()
    duration = 0.3 if args.quick else 1.0
    providers = ["shm", "tcp"] + (["verbs"] if rdma_devices() else [])
    links: list = []
    try:
        links.append(PlainTcp())
        links += [RdmaLink(p) for p in providers]
        results = measure(links, args.quick, duration)
    finally:
        for link in links:
            link.close()
    ratios = {
        f"{p}_p50_over_plain_tcp_rtt_{size}": round(
            results[p][str(size)]["p50_us"] / results["plain_tcp"][str(size)]["p50_us"], 2
        )
        for p in providers
        for size in SIZES
    }
    for p in providers:
        if p != "shm":
            for size in SIZES:
                ratios[f"{p}_paired_ratio_p50_{size}"] = results[p][str(size)]["paired_ratio_p50"]
    results["ratios"] = ratios
    results["targets"] = {
        "shm_64B_p50_le_10us": results["shm"]["64"]["p50_us"] <= 10,
        "tcp_64B_p50_le_1.5x_plain_rtt": ratios["tcp_paired_ratio_p50_64"] <= 1.5,
    }
    results["meta"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "time": time.strftime("%FT%TZ", time.gmtime()),
    }
    print(f"{'transport':<10} {'size':>6} {'p50 us':>9} {'p99 us':>9} {'ops/s':>9} {'MB/s':>8}")
    for name in ["plain_tcp", *providers]:
        for size in SIZES:
            r = results[name][str(size)]
            cols = f"{r['p50_us']:>9} {r['p99_us']:>9} {r['ops_per_s']:>9} {r['mb_per_s']:>8}"
            print(f"{name:<10} {size:>6} {cols}")
    for p in providers:
        print(f"{p} idle cq.wait CPU: {results[p]['idle_wait_cpu_pct']} %")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    for k, v in results["targets"].items():
        print(f"target {k}: {'met' if v else 'MISSED'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
