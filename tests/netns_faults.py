"""Faults of one host of a NetnsCluster (tests/netns_cluster.py), as methods mixed into it: its
supervisor paused and resumed, its link cut and restored, its path to one peer cut, the packets
its peers send it dropped (it still reaches them), its transport made flaky, the disk of its
data_dir filled (each node's data_dir is a tmpfs of its own: tests/small_disk.py), its
power cut (a disk that keeps only what was synced: tests/power_cut_fs.py), its leadership handed
on by `supervise handover`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .small_disk import fill

if TYPE_CHECKING:
    from .netns_cluster import NetnsNode


class HostFaults:
    """Mixed into NetnsCluster; ``key`` is a node's index, name or the node itself."""

    def pause(self, key: int | str | NetnsNode) -> None:
        node = self.node(key)
        if node.supervisor_alive():
            node.supervisor.send_signal(signal.SIGSTOP)
            node.paused = True

    def resume(self, key: int | str | NetnsNode) -> None:
        node = self.node(key)
        if node.supervisor is not None and node.supervisor.poll() is None:
            node.supervisor.send_signal(signal.SIGCONT)
        node.paused = False

    def partition(self, key: int | str | NetnsNode) -> None:
        node = self.node(key)
        self.hosts.link_down(node.index)
        node.partitioned = True

    def heal(self, key: int | str | NetnsNode) -> None:
        node = self.node(key)
        self.hosts.link_up(node.index)
        node.partitioned = False

    def cut_between(self, a: int | str | NetnsNode, b: int | str | NetnsNode) -> None:
        """A partial partition: ``a`` and ``b`` cannot reach each other; every other path works."""
        i, j = self.node(a).index, self.node(b).index
        self.hosts.block(i, j)
        self.hosts.block(j, i)

    def deafen(self, key: int | str | NetnsNode) -> None:
        """What the other nodes send the node is dropped on arrival; what it sends still arrives,
        and clients still reach it."""
        node = self.node(key)
        for other in self.nodes:
            if other is not node:
                self.hosts.block(other.index, node.index)

    def heal_paths(self) -> None:
        """Undo every ``cut_between`` and ``deafen``."""
        self.hosts.unblock_all()

    def handover(self) -> subprocess.CompletedProcess:
        """`supervise handover` as an operator on the client host runs it: a signed request over
        the network to whichever node leads."""
        return self.client_host.run([sys.executable, "-m", "supervise", "handover", "--config",
                                     str(self.config)], timeout=90)

    def failpoints_file(self, node: NetnsNode) -> Path:
        return self.workdir / f"{node.name}-failpoints.json"

    def degrade(self, key: int | str | NetnsNode, spec: dict) -> None:
        """The node's outgoing transport requests are dropped, held and duplicated per ``spec``
        (supervise's tcp failpoints; its supervisor applies the file within 0.2 s)."""
        path = self.failpoints_file(self.node(key))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        tmp.replace(path)

    def restore(self, key: int | str | NetnsNode) -> None:
        self.degrade(key, {})

    def data_dir(self, node: NetnsNode) -> Path:
        return self.workdir / f"{node.name}-data"

    def fill_disk(self, key: int | str | NetnsNode) -> None:
        """No byte left on the node's data_dir disk until ``clear_disk``."""
        fill(self.data_dir(self.node(key)))

    def clear_disk(self, key: int | str | NetnsNode) -> None:
        (self.data_dir(self.node(key)) / "ballast").unlink(missing_ok=True)

    def cut_power(self, key: int | str | NetnsNode) -> None:
        """The host loses power: supervisor and server killed, and of its data_dir only what was
        synced is left. Restart it with ``restart``."""
        node = self.node(key)
        disk = self.power_disks[node.name]
        disk.power_off()
        self.kill(node, "both")
        disk.power_on()
