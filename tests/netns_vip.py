"""Who holds a NetnsCluster's virtual IP (tests/netns_cluster.py), as methods mixed into it: by
each host's addresses, and by the client host's neighbour table."""

from __future__ import annotations

import socket
import subprocess


class VipView:
    """Mixed into NetnsCluster."""

    def vip_holders(self) -> list[str]:
        """Names of the nodes whose eth0 carries the VIP (``ip -n NS addr``)."""
        if self.vip is None:
            return []
        out = []
        for node in self.nodes:
            text = subprocess.run(["ip", "-n", node.ns, "-o", "addr", "show", "dev", "eth0"],
                                  capture_output=True, text=True, timeout=10).stdout
            if f" {self.vip}/" in text:
                out.append(node.name)
        return out

    def vip_holders_netlink(self) -> list[str]:
        """The same as ``vip_holders``, asked over netlink from inside each host (cheap)."""
        if self.vip is None:
            return []

        def has_vip() -> bool:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                return any(a.get_attr("IFA_ADDRESS") == self.vip for a in ipr.get_addr(family=socket.AF_INET))

        return [node.name for node in self.nodes if self.in_ns(node.ns, has_vip)]

    def vip_arp_owner(self) -> str | None:
        """The node whose MAC the client host's neighbour table has for the VIP (None: no entry)."""
        if self.vip is None:
            return None

        def mac_of(ns_is_client: bool) -> str | None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                if ns_is_client:
                    for n in ipr.get_neighbours(dst=self.vip):
                        return n.get_attr("NDA_LLADDR")
                    return None
                index = ipr.link_lookup(ifname="eth0")[0]
                return ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")

        mac = self.in_client_ns(mac_of, True)
        if mac is None:
            return None
        if not hasattr(self, "_macs"):
            self._macs = {self.in_ns(n.ns, mac_of, False): n.name for n in self.nodes}
        return self._macs.get(mac, mac)
