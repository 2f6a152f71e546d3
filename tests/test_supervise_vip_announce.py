"""The VIP on a host: its announcement moves clients to its new holder at once, also a client
whose neighbour entry for the VIP was refreshed a moment before (inside the kernel's
``locktime``, where only a true gratuitous ARP may override it); and it is a lease, which a live
holder keeps renewing and which runs out when the holder is killed with -9."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from pyroute2 import IPRoute

from supervise.vip import LEASE_SECONDS, VirtualIP

from .netns import Hosts, enter_netns

VIP = "10.77.0.100"


def _mac() -> str:
    with IPRoute() as ipr:
        return ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0].get_attr("IFLA_ADDRESS")


def _neighbour_mac(addr: str) -> str | None:
    with IPRoute() as ipr:
        for n in ipr.get_neighbours(dst=addr):
            return n.get_attr("NDA_LLADDR")
    return None


def _answered(addr: str) -> bool:
    """A TCP connection to a closed port: refused means the address's holder answered."""
    try:
        socket.create_connection((addr, 9), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True


def test_client_follows_the_vip_to_its_new_holder_right_after_resolving_the_old_one():
    with Hosts(3) as hosts:
        old, new, client = hosts
        pools = {h.name: ThreadPoolExecutor(1, initializer=enter_netns, initargs=(h.name,)) for h in hosts}
        try:
            def on(host, fn, *args):
                return pools[host.name].submit(fn, *args).result(30)

            # a neighbour entry refreshed less than 10 s ago ignores all but gratuitous ARP
            sysctl = client.run(["sysctl", "-w", "net.ipv4.neigh.eth0.locktime=1000"])
            assert sysctl.returncode == 0, sysctl.stderr
            vip_old = VirtualIP(f"{VIP}/24", "eth0")
            vip_new = VirtualIP(f"{VIP}/24", "eth0")
            on(old, vip_old.take)
            assert on(client, _answered, VIP)
            assert on(client, _neighbour_mac, VIP) == on(old, _mac)

            on(old, vip_old.release)
            on(new, vip_new.take)
            new_mac = on(new, _mac)
            deadline = time.monotonic() + 2
            while on(client, _neighbour_mac, VIP) != new_mac and time.monotonic() < deadline:
                time.sleep(0.05)
            assert on(client, _neighbour_mac, VIP) == new_mac, "the client still sends to the old holder"
            assert on(client, _answered, VIP)
            on(new, vip_new.release)
        finally:
            for pool in pools.values():
                pool.shutdown(wait=True)


HOLDER = f"""
from supervise.vip import VirtualIP
VirtualIP("{VIP}/24", "eth0").take()
print("taken", flush=True)
import time
time.sleep(3600)
"""


@contextlib.contextmanager
def _vip_holder() -> Iterator[tuple[subprocess.Popen, Callable[[], bool]]]:
    """A process on a one-host segment that took the VIP, and a check that the host holds it."""
    with Hosts(1) as hosts:
        host = hosts[0]

        def held() -> bool:
            return f" {VIP}/" in host.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout

        holder = host.popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "taken"
            yield holder, held
        finally:
            holder.kill()
            holder.wait(10)


def _wait_gone(held: Callable[[], bool], since: float) -> None:
    while held() and time.monotonic() < since + LEASE_SECONDS + 3:
        time.sleep(0.2)


def test_a_live_holder_keeps_the_vip_past_its_lease_and_a_killed_one_loses_it():
    with _vip_holder() as (holder, held):
        deadline = time.monotonic() + LEASE_SECONDS + 2
        while time.monotonic() < deadline:
            assert held(), "the VIP expired while its holder was alive"
            time.sleep(0.2)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        _wait_gone(held, time.monotonic())
        assert not held(), "the VIP outlived its killed holder's lease"


def test_a_holder_stalled_past_its_lease_does_not_claim_the_vip_again():
    with _vip_holder() as (holder, held):
        holder.send_signal(signal.SIGSTOP)
        _wait_gone(held, time.monotonic())
        assert not held(), "the VIP outlived its stalled holder's lease"
        holder.send_signal(signal.SIGCONT)
        time.sleep(3)  # three renewal periods
        assert not held(), "a holder whose lease ran out claimed the VIP again"
        assert holder.poll() is None
