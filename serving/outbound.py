"""Where the backend may connect to fetch images: the Label Studio origin, public addresses, an allow-list.

Task image URLs come from whoever can create tasks, so a fetch must not become a way into the backend's own
network. ``OutboundPolicy`` decides on the address a socket actually connected to (after DNS, so a name that
resolves to a private address is refused too, whatever it resolved to when the URL was checked), and
``GuardedSession`` applies it to every connection the fetcher's ``requests`` session opens, redirects
included. Refused and unreachable targets fail the same way, so error messages cannot map the network.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import parse_url

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}


class AddressRefused(OSError):
    """A connection the policy does not allow (requests reports it as a ConnectionError)."""


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL exactly as requests/urllib3 will connect to it."""
    parts = parse_url(url)
    scheme = (parts.scheme or "").lower()
    return scheme, (parts.host or "").lower().strip("[]"), parts.port or DEFAULT_PORTS.get(scheme)


class OutboundPolicy:
    """Allows the Label Studio origin, every public address, and what ``allow`` names.

    ``allow`` holds IP networks (``10.0.0.0/8``, ``127.0.0.1``) and host names (``images.internal``); private,
    loopback, link-local and other non-public addresses are refused unless listed.
    """

    def __init__(self, label_studio_url: str | None = None, allow: Iterable[str] = ()) -> None:
        self.label_studio = origin(label_studio_url)[1:] if label_studio_url else None
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.hosts: set[str] = set()
        for entry in (a.strip() for a in allow):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower())

    def allows(self, host: str, port: int | None, address: str) -> bool:
        host = (host or "").lower().strip("[]")
        if self.label_studio is not None and (host, port) == self.label_studio:
            return True
        if host in self.hosts:
            return True
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks) or ip.is_global


def _guarded(connection_class, policy: OutboundPolicy):
    class GuardedConnection(connection_class):
        def _new_conn(self):
            sock = super()._new_conn()
            address = sock.getpeername()[0]
            if not policy.allows(self.host, self.port, address):
                sock.close()
                log.warning("refused to fetch from %s:%s (%s): not a public address and not allowed by "
                            "SAMLIGHT_FETCH_ALLOW", self.host, self.port, address)
                raise AddressRefused(f"{self.host}:{self.port} is not an allowed address")
            return sock

    return GuardedConnection


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: OutboundPolicy) -> None:
        self.policy = policy
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        http = type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": _guarded(HTTPConnection, self.policy)})
        https = type("GuardedHTTPSPool", (HTTPSConnectionPool,),
                     {"ConnectionCls": _guarded(HTTPSConnection, self.policy)})
        self.poolmanager.pool_classes_by_scheme = {"http": http, "https": https}


class GuardedSession(requests.Session):
    """A requests session whose every connection passes ``policy``; no proxies or .netrc from the environment
    (they would send requests, and credentials, somewhere the policy never sees)."""

    def __init__(self, policy: OutboundPolicy) -> None:
        super().__init__()
        self.trust_env = False
        adapter = _GuardedAdapter(policy)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
