"""Where a job's callback may go: an allow-list of hosts, each with an optional port.

``CALLBACK_ALLOWED_HOSTS`` (and a tenant's own list in ``API_KEYS``) holds entries such as
``hooks.example.com``, ``hooks.example.com:8443`` or ``127.0.0.1:9000``. An entry without
a port allows ports 80 and 443 only. The client checks a ``callback_url`` against it when a
job is submitted, and the gateway again when it sends (``producer.api.callbacks``), where it
also refuses a name that resolves to a private, loopback or link-local address: only an
entry that is itself such an address (``127.0.0.1:9000``) allows one.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from jobqueue.protocol import JobRecord, JobStatus

#: The ports an entry without one allows.
DEFAULT_PORTS = frozenset({80, 443})
_SCHEME_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}\.?)*$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class HostEntry:
    host: str
    port: int | None = None

    @property
    def address(self) -> IPAddress | None:
        """The entry's IP address when the entry is one (``127.0.0.1:9000``), else None."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True)
class CallbackTarget:
    """A callback URL's parts: its host (lowercased, without brackets) and its port."""

    scheme: str
    host: str
    port: int

    @property
    def origin(self) -> str:
        """``host:port``: what the callbacks' limits count per (pending, and sent at once)."""
        return f"{self.host}:{self.port}"


def callback_target(url: str) -> CallbackTarget | None:
    """The host and port a URL names (the scheme's port if none), or None for a URL that names none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEME_PORTS or not parts.hostname:
        return None
    return CallbackTarget(scheme, parts.hostname.lower(), port if port is not None else _SCHEME_PORTS[scheme])


def parse_entry(text: str) -> HostEntry:
    """``host``, ``host:port``, ``1.2.3.4:port`` or ``[::1]:port``; ValueError otherwise."""
    text = text.strip().lower()
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _NAME.match(host):
            raise ValueError(f"{text!r} is not a host name, an address, or either with :port") from None
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return HostEntry(host.rstrip("."), int(port) if port is not None else None)


@dataclass(frozen=True)
class AllowedHosts:
    entries: tuple[HostEntry, ...] = ()

    @classmethod
    def parse(cls, text: str, separator: str | None = ",") -> AllowedHosts:
        """Entries separated by ``separator`` (None: whitespace). Raises ValueError naming a bad one."""
        return cls(tuple(parse_entry(item) for item in text.split(separator) if item.strip()))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __str__(self) -> str:
        return ",".join(str(entry) for entry in self.entries)

    def match(self, url: str) -> HostEntry | None:
        """The entry that allows ``url``'s host and port, or None."""
        target = callback_target(url)
        if target is None:
            return None
        for entry in self.entries:
            if entry.host == target.host and (
                    target.port == entry.port if entry.port is not None else target.port in DEFAULT_PORTS):
                return entry
        return None

    def refusal(self, url: str) -> str | None:
        """Why ``url`` is not allowed (None: it is), for an error message."""
        if self.match(url) is not None:
            return None
        target = callback_target(url)
        host = target.host if target is not None else ""
        if target is None or all(entry.host != host for entry in self.entries):
            return f"host {host!r} is not in CALLBACK_ALLOWED_HOSTS"
        return (f"port {target.port} of {host!r} is not allowed (an entry without a port allows "
                f"80 and 443 only; list it as {host}:{target.port})")


def _unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:127.0.0.1`` is 127.0.0.1."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refused_address(address: IPAddress, entry: HostEntry) -> bool:
    """A resolved address the gateway must not call: not public, unless the entry names it itself."""
    address = _unmapped(address)
    if entry.address is not None and address == _unmapped(entry.address):
        return False
    return not address.is_global or address.is_multicast


def callback_owner(record: JobRecord) -> str:
    """What a final record's pending callback counts against, ``<host:port>\\n<tenant>``; "" for no
    callback: none asked for, or a job its own client cancelled without ``callback_on_cancel``."""
    request = record.request
    if request is None or not request.callback_url:
        return ""
    if record.status is JobStatus.CANCELLED and not request.callback_on_cancel:
        return ""
    target = callback_target(request.callback_url)
    return f"{target.origin if target is not None else ''}\n{request.tenant or ''}"
