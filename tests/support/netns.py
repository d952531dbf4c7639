"""Several hosts on one machine: the root network namespace is the server host, and each worker host is a
network namespace joined to it by a veth pair of its own, with real addresses. Cutting a host's link off
and bringing it back is a network partition of that host; socat forwarders let a host reach a server
that listens on 127.0.0.1 only.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); ``make_hosts`` raises ``NamespacesRefused`` with ``ip``'s
own words where that is missing, so a test can skip with them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

#: Each host gets a /24 of this range: the root side is .1, the host .2.
SUBNET_PREFIX = "10.231"


class NamespacesRefused(RuntimeError):
    """``ip netns add`` failed (no CAP_SYS_ADMIN, say); the message is its stderr."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Host:
    """One worker host: namespace ``namespace``, linked to the root namespace by ``root_link``."""

    namespace: str
    #: The root side of the veth pair (its peer, inside the namespace, is ``host_link``).
    root_link: str
    host_link: str
    #: The server's address as this host reaches it (the root side), and the host's own.
    server_address: str
    address: str

    def command_prefix(self) -> list[str]:
        """Run a command on this host. ``ip netns exec`` execs: the pid and process group stay the same."""
        return ["ip", "netns", "exec", self.namespace]

    def cut(self) -> None:
        """Partition the host: nothing passes its link, both ways, until ``restore``."""
        _ip("link", "set", self.root_link, "down")

    def restore(self) -> None:
        # Bringing the link up puts its connected route back: the host is reachable again.
        _ip("link", "set", self.root_link, "up")

    def create(self) -> None:
        try:
            _ip("netns", "add", self.namespace)
        except RuntimeError as err:
            raise NamespacesRefused(str(err)) from None
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", self.host_link)
        _ip("link", "set", self.host_link, "netns", self.namespace)
        _ip("addr", "add", f"{self.server_address}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        inside = ["netns", "exec", self.namespace, "ip"]
        _ip(*inside, "addr", "add", f"{self.address}/24", "dev", self.host_link)
        _ip(*inside, "link", "set", self.host_link, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def delete(self) -> None:
        """Delete the namespace; its veth pair goes with it (and the root side with the peer)."""
        subprocess.run(["ip", "netns", "delete", self.namespace], capture_output=True, timeout=30)
        # Only if the pair was made but never moved into the namespace.
        subprocess.run(["ip", "link", "delete", self.root_link], capture_output=True, timeout=30)


def _free_subnets(count: int) -> list[int]:
    """Third octets of ``SUBNET_PREFIX`` subnets that no interface here has an address in."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                           timeout=30).stdout
    taken = {int(n) for n in re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", shown)}
    free = [n for n in range(1, 255) if n not in taken][:count]
    if len(free) < count:
        raise RuntimeError(f"no {count} free subnets left in {SUBNET_PREFIX}.0.0/16")
    return free


def make_hosts(name: str, count: int) -> list[Host]:
    """``count`` worker hosts, namespaces ``{name}w1``, ``{name}w2``, ... (``name`` short: the
    interfaces are named after them and Linux allows 15 characters)."""
    if shutil.which("ip") is None:
        raise NamespacesRefused("ip (iproute2) is not installed")
    hosts = [Host(namespace=f"{name}w{i}", root_link=f"{name}w{i}r", host_link=f"{name}w{i}h",
                  server_address=f"{SUBNET_PREFIX}.{n}.1", address=f"{SUBNET_PREFIX}.{n}.2")
             for i, n in enumerate(_free_subnets(count), 1)]
    made: list[Host] = []
    try:
        for host in hosts:
            made.append(host)
            host.create()
    except BaseException:
        for host in made:
            host.delete()
        raise
    return hosts


class Forwarder:
    """``socat`` accepting on ``listen_address:port`` and forwarding each connection to ``target``
    (``host:port``), in a process group of its own: ``stop`` ends the forked per-connection children too."""

    def __init__(self, listen_address: str, port: int, target: str):
        self.listen_address = listen_address
        self.port = port
        self.target = target
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> Forwarder:
        listen = f"TCP-LISTEN:{self.port},bind={self.listen_address},reuseaddr,fork"
        self.process = subprocess.Popen(["socat", listen, f"TCP:{self.target}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection((self.listen_address, self.port), 1):
                return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"socat does not listen on {self.listen_address}:{self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
