"""The leader's virtual IP: added with pyroute2 and announced with gratuitous ARP, as
keepalived does, so that clients and switches move to the new leader at once."""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct

from pyroute2 import IPRoute

log = logging.getLogger("supervise.vip")
ETH_P_ARP = 0x0806


class VirtualIP:
    def __init__(self, address: str, interface: str) -> None:
        self.iface = ipaddress.ip_interface(address)
        self.interface = interface

    def take(self) -> None:
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self.interface)
            if not links:
                raise RuntimeError(f"vip_interface {self.interface!r} does not exist on this host")
            index = links[0]
            present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            if str(self.iface.ip) not in present:
                ipr.addr("add", index=index, address=str(self.iface.ip),
                         prefixlen=self.iface.network.prefixlen)
            mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
        self._announce(mac)
        log.info("took virtual IP %s on %s", self.iface, self.interface)

    def release(self) -> None:
        try:
            with IPRoute() as ipr:
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
