"""The leader's virtual IP: added with pyroute2 and announced with gratuitous ARP, as
keepalived does, so that clients and switches move to the new leader at once.

The address is a lease: it carries a valid lifetime of LEASE_SECONDS that a thread renews every
RENEW_SECONDS while the node leads. A supervisor killed with -9 cannot drop the address, so the
kernel does, when the lease runs out: its host stops answering for the VIP within seconds. A
lease that ran out is never renewed: a leader stalled that long (stopped with SIGSTOP, say) has
been replaced, and its late claim would pull clients back from the new leader.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger("supervise.vip")
ETH_P_ARP = 0x0806
LEASE_SECONDS = 5
RENEW_SECONDS = 1.0


def _ip_route():
    from pyroute2 import IPRoute  # imported when used: importing it takes a quarter of a second

    return IPRoute()


class VirtualIP:
    def __init__(self, address: str, interface: str) -> None:
        self.iface = ipaddress.ip_interface(address)
        self.interface = interface
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def take(self) -> None:
        """Add the address (or renew its lease), announce it, and keep renewing until release()."""
        self._lease(create=True)
        log.info("took virtual IP %s on %s (a %d s lease, renewed every %.0f s)", self.iface,
                 self.interface, LEASE_SECONDS, RENEW_SECONDS)
        if self._renewer is None:
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew, name="vip-lease", daemon=True)
            self._renewer.start()

    def _lease(self, create: bool) -> bool:
        """Add the address and announce it (``create``), or renew its lease if it is still there;
        False when it was not there to renew."""
        with _ip_route() as ipr:
            links = ipr.link_lookup(ifname=self.interface)
            if not links:
                raise RuntimeError(f"vip_interface {self.interface!r} does not exist on this host")
            index = links[0]
            present = str(self.iface.ip) in {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            if not present and not create:
                return False
            ipr.addr("replace", index=index, address=str(self.iface.ip),
                     prefixlen=self.iface.network.prefixlen,
                     IFA_CACHEINFO={"ifa_preferred": LEASE_SECONDS, "ifa_valid": LEASE_SECONDS,
                                    "cstamp": 0, "tstamp": 0})
            mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
        if create:
            self._announce(mac)
        return True

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                if not self._lease(create=False):
                    log.error("virtual IP %s ran out on %s: its renewal came more than %d s late, so "
                              "this node no longer claims it (the next leadership change takes it)",
                              self.iface, self.interface, LEASE_SECONDS)
                    return
            except Exception as exc:  # noqa: BLE001 - keep trying while the lease lasts
                log.warning("renewing virtual IP %s on %s: %s", self.iface, self.interface, exc)

    def release(self) -> None:
        if self._renewer is not None:
            self._stop.set()
            if self._renewer is not threading.current_thread():
                self._renewer.join()
            self._renewer = None
        try:
            with _ip_route() as ipr:
                links = ipr.link_lookup(ifname=self.interface)
                if links:
                    ipr.addr("del", index=links[0], address=str(self.iface.ip),
                             prefixlen=self.iface.network.prefixlen)
                    log.info("dropped virtual IP %s from %s", self.iface, self.interface)
        except Exception as exc:  # noqa: BLE001 - an address already gone is fine
            log.debug("dropping virtual IP: %s", exc)

    def _announce(self, mac: str, rounds: int = 3) -> None:
        """Gratuitous ARP, as Linux recognises it: a request whose sender and target are both the
        virtual IP (an RFC 5227 announcement) and a reply whose target MAC is also the sender's.
        Anything else (a reply to ff:ff:ff:ff:ff:ff, say) is ignored by a neighbour entry updated
        less than ``locktime`` (1 s) ago, so clients that had just resolved the old leader would
        keep sending to it until their entry expires, tens of seconds later."""
        hw = bytes.fromhex(mac.replace(":", ""))
        ip = self.iface.ip.packed
        head = b"\xff" * 6 + hw + struct.pack("!H", ETH_P_ARP)
        request = head + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\x00" * 6 + ip
        reply = head + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + hw + ip + hw + ip
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((self.interface, 0))
            for _ in range(rounds):
                sock.send(request)
                sock.send(reply)


class LeaderVip:
    """A node's hold on its cluster's VIP; does nothing when the cluster has none."""

    def __init__(self, address: str | None, interface: str | None) -> None:
        self.address = address
        self.interface = interface or ""
        self._held: VirtualIP | None = None

    def drop_stale(self) -> None:
        """A supervisor killed while leading leaves its VIP behind; a starting node leads nothing."""
        if self.address is not None:
            VirtualIP(self.address, self.interface).release()

    def take(self, still_leading: Callable[[], bool]) -> None:
        if self.address is None:
            return
        vip = VirtualIP(self.address, self.interface)
        vip.take()
        self._held = vip
        if not still_leading():
            self.drop()  # leadership ended while the address was being taken

    def drop(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None
