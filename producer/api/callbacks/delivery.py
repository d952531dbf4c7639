"""One attempt to POST a callback: signed, sent only to an address the allow-list permits, and
bounded as a whole (resolving, connecting, sending and reading the answer) by one deadline."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket

import httpx
from standardwebhooks import Webhook

from jobqueue.callback_hosts import AllowedHosts, HostEntry, IPAddress, callback_target, refused_address

#: At most this much of a receiver's answer is read: only its status counts.
MAX_ANSWER_BYTES = 1024


class Refused(Exception):
    """A callback the gateway must not send (not allowed, or an internal address): given up at once."""


def signed_headers(webhook: Webhook, message_id: str, body: bytes, now: float) -> dict[str, str]:
    """Standard Webhooks' headers: the signature covers the message id, the timestamp and the body,
    so a receiver that checks the timestamp's age refuses a replay."""
    timestamp = datetime.datetime.fromtimestamp(int(now), tz=datetime.timezone.utc)
    return {"Content-Type": "application/json", "webhook-id": message_id,
            "webhook-timestamp": str(int(now)), "webhook-signature": webhook.sign(message_id, timestamp, body)}


async def send(http: httpx.AsyncClient, url: str, allowed: AllowedHosts, body: bytes,
               headers: dict[str, str], deadline_s: float) -> str | None:
    """POST ``body`` to ``url``; None when the receiver answered 2xx, else why not (to retry).
    Raises Refused for a URL the allow-list does not permit now, or that resolves to an internal
    address that is not itself an entry."""
    entry = allowed.match(url)
    if entry is None:
        raise Refused(f"{allowed.refusal(url)} (checked when sending)")
    try:
        async with asyncio.timeout(deadline_s):
            address = await _resolve(url, entry)
            return await _post(http, url, address, body, headers)
    except TimeoutError:
        return f"no answer within {deadline_s:g}s (CALLBACK_TIMEOUT_S)"
    except (httpx.HTTPError, OSError) as err:  # refused, reset, a name that does not resolve
        return f"{type(err).__name__}: {err}"


async def _resolve(url: str, entry: HostEntry) -> IPAddress:
    """The address to connect to: every address the host resolves to must be allowed."""
    target = callback_target(url)
    try:
        addresses = [ipaddress.ip_address(target.host)]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [str(address) for address in addresses if refused_address(address, entry)]
    if refused or not addresses:
        raise Refused(f"{target.host} resolves to {', '.join(refused) or 'nothing'}: private, loopback or "
                      "link-local addresses need an entry of their own in the allow-list")
    return addresses[0]


async def _post(http: httpx.AsyncClient, url: str, address: IPAddress, body: bytes,
                headers: dict[str, str]) -> str | None:
    """POST to the resolved address (no second lookup a DNS answer could change), naming the host
    in Host and in TLS's SNI; reads at most MAX_ANSWER_BYTES of the answer."""
    original = httpx.URL(url)
    host_header = original.netloc.decode()  # host[:port], never the userinfo
    pinned = original.copy_with(host=str(address))
    async with http.stream("POST", pinned, content=body, headers={**headers, "Host": host_header},
                           extensions={"sni_hostname": original.host}) as answer:
        read = 0
        async for chunk in answer.aiter_raw():
            read += len(chunk)
            if read >= MAX_ANSWER_BYTES:
                break
    return None if answer.is_success else f"HTTP {answer.status_code}"
