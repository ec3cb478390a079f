"""Hosts as Linux network namespaces, for multi-host rehearsals on one machine.

:class:`Hosts` makes a switch (a namespace holding a bridge) and, per host, a
namespace with one veth port on that switch and its own address, so roles in
different hosts talk over real interfaces and routes, never 127.0.0.1. A host
may also sit alone on a private link to another host (:meth:`Hosts.private`),
which does not forward: the private host reaches only that one, as a machine
behind NAT reaches only its router. Needs root and ``ip`` (iproute2); every
namespace is deleted on :meth:`Hosts.close` (their interfaces go with them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


class NetnsUnavailable(RuntimeError):
    """This kernel or machine cannot make network namespaces (the reason says which part failed)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    def __init__(self, subnet: str = "10.66.0"):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise NetnsUnavailable("network namespaces need root and iproute2's ip")
        self.tag = f"swr{uuid.uuid4().hex[:6]}"
        self.subnet, self.namespaces, self.count, self.links = subnet, [], 0, 0
        self.switch = self._namespace("sw")
        try:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except RuntimeError as e:
            self.close()
            raise NetnsUnavailable(f"no bridge device in this kernel: {e}") from None
        self.hosts: dict[str, tuple[str, str]] = {}
        """name -> (namespace, address on the switch)."""

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        try:
            _ip("netns", "add", ns)
        except RuntimeError as e:
            raise NetnsUnavailable(f"cannot add a network namespace: {e}") from None
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def add(self, name: str) -> tuple[str, str]:
        """A new host on the switch: ``(namespace, address)``."""
        self.count += 1
        ns, address, port = self._namespace(name), f"{self.subnet}.{self.count}", f"p{self.count}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = (ns, address)
        return ns, address

    def private(self, name: str, router: str, subnet: str = "10.67.0") -> tuple[str, str, str]:
        """A new host whose only link is to host ``router`` (which does not forward):
        ``(namespace, its address, the router's address on that link)``."""
        self.links += 1
        ns, router_ns = self._namespace(name), self.hosts[router][0]
        base = 4 * (self.links - 1)  # a /30 per link
        inside, outside = f"{subnet}.{base + 2}", f"{subnet}.{base + 1}"
        link = f"l{self.links}"
        _ip("-n", router_ns, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", router_ns, "addr", "add", f"{outside}/30", "dev", link)
        _ip("-n", router_ns, "link", "set", link, "up")
        _ip("-n", ns, "addr", "add", f"{inside}/30", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = (ns, inside)
        return ns, inside, outside

    def exec_prefix(self, name: str) -> list[str]:
        """argv prefix that runs a command in host ``name`` (``ip netns exec`` execs: same pid)."""
        return ["ip", "netns", "exec", self.hosts[name][0]]

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()
