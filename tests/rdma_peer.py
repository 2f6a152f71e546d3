"""A real peer process for the rdma tests, driven by JSON lines on stdin/stdout.

Usage: python tests/rdma_peer.py PROVIDER LISTEN_HOST SECRET_HEX REGIONS_JSON [HANDSHAKE_TIMEOUT]
where REGIONS_JSON maps a region name to [size, access flags]. It opens a context, registers the
regions, listens, prints ``{"endpoint":..., "pid":...}`` and then answers one command per line.
Bytes travel as hex. The process exits on ``exit`` or when stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rdma import Access, Listener, connect, open_context  # noqa: E402


def _wc(w) -> list:
    return [w.wr_id, int(w.status), int(w.opcode), w.byte_len, w.imm_data]


class PeerState:
    def __init__(self, provider: str, host: str, secret: bytes, regions: dict, hs_timeout: float) -> None:
        self.ctx = open_context(provider)
        self.pd = self.ctx.alloc_pd()
        self.cq = self.ctx.create_cq()
        self.secret = secret
        self.mrs = {
            name: self.pd.reg_mr(int(size), Access(int(acc))) for name, (size, acc) in regions.items()
        }
        self.private = json.dumps(self.regions()).encode()
        self.lst = Listener(
            self.ctx, self.pd, f"{host}:0", secret, self.cq, self.cq, self.private, hs_timeout
        )
        self.qps: list = []
        self.remotes: list[dict] = []

    def regions(self) -> dict:
        return {n: [m.addr, m.length, m.rkey] for n, m in self.mrs.items()}

    def handle(self, cmd: str, args: list):
        if cmd == "accept":
            c = self.lst.accept(timeout=args[0])
            if c is None:
                return None
            self.qps.append(c.qp)
            self.remotes.append(json.loads(c.peer_private_data or b"{}"))
            return len(self.qps) - 1
        if cmd == "connect":
            c = connect(self.ctx, self.pd, args[0], self.secret, self.cq, self.cq, self.private, timeout=5)
            self.qps.append(c.qp)
            self.remotes.append(json.loads(c.peer_private_data))
            return len(self.qps) - 1
        if cmd == "read":
            name, off, n = args
            return bytes(self.mrs[name].buf[off : off + n]).hex()
        if cmd == "fill":
            name, off, data = args
            b = bytes.fromhex(data)
            self.mrs[name].buf[off : off + len(b)] = b
            return None
        if cmd == "post_recv":
            qi, name, off, n, wr_id = args
            self.qps[qi].post_recv(self.mrs[name], off, n, wr_id)
            return None
        if cmd == "write":  # qi, local name, local off, length, remote name, remote off, wr_id
            qi, lname, loff, n, rname, roff, wr_id = args
            addr, _, rkey = self.remotes[qi][rname]
            self.qps[qi].post_write(self.mrs[lname], loff, n, addr + roff, rkey, wr_id)
            return None
        if cmd == "wait":  # timeout, count[, spin]: collect completions
            timeout, count = args[:2]
            spin = args[2] if len(args) > 2 else None
            out: list = []
            deadline = time.monotonic() + timeout
            while len(out) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                out += [_wc(w) for w in self.cq.wait(left, count - len(out), spin=spin)]
            return out
        if cmd == "dereg":
            self.mrs.pop(args[0]).close()
            return None
        if cmd == "refused":
            return self.lst.refusals()
        if cmd == "state":
            return int(self.qps[args[0]].state)
        if cmd == "close_qp":
            self.qps[args[0]].close()
            return None
        raise ValueError(f"unknown command {cmd!r}")


def main() -> None:
    provider, host, secret_hex, regions_json = sys.argv[1:5]
    hs_timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 2.0
    st = PeerState(provider, host, bytes.fromhex(secret_hex), json.loads(regions_json), hs_timeout)
    out = sys.stdout
    out.write(json.dumps({"endpoint": st.lst.endpoint, "pid": os.getpid(), "regions": st.regions()}) + "\n")
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        if msg[0] == "exit":
            break
        try:
            reply = {"ok": st.handle(msg[0], msg[1:])}
        except Exception as e:  # report to the test, keep serving
            reply = {"err": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    st.lst.close()
    st.ctx.close()


if __name__ == "__main__":
    main()
