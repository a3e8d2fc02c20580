"""The SSRF guard: which URLs a webhook may target, checked when a subscription is made
and again before every delivery.

A target is an ``https`` URL without credentials whose host resolves only to public
addresses: every address it resolves to is checked, and a delivery connects to the
checked address itself (``Target.connect_url``, the host name kept for TLS and the
``Host`` header), so a DNS answer that changes between the check and the connection
(DNS rebinding) cannot send it elsewhere. Refused: loopback, link-local, private
(RFC 1918, shared 100.64/10, ULA fc00::/7), multicast, reserved, unspecified, the cloud
metadata address and anything else not globally routable, IPv4-mapped IPv6 forms
included. ``LORAPLEX_WEBHOOK_ALLOW`` names hosts and CIDRs the operator allows anyway,
plain ``http`` included (a receiver on the same network, the tests' on loopback).
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]
MAX_URL_LENGTH = 2048
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
"""The cloud metadata service (AWS, GCP, Azure, OpenStack; AWS's IPv6 one)."""


class TargetRefused(ValueError):
    """A webhook URL the guard will not send to; the message says why."""

    code = "webhook_target_refused"


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses it may be reached at."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    """Path and query, as sent."""
    addresses: list[IPAddress]

    def connect_url(self, address: IPAddress) -> str:
        """The URL with the host replaced by one checked address."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    def host_header(self) -> str:
        default = {"https": 443, "http": 80}[self.scheme]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the system resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def why_refused(address: IPAddress) -> str | None:
    """Why an address is no public webhook target; None if it is one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    checks: list[tuple[bool, str]] = [
        (address in METADATA, "the cloud metadata address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a globally routable address"),
    ]
    return next((why for refused, why in checks if refused), None)


class Guard:
    """Checks webhook URLs; ``allow`` lists host names and CIDRs allowed regardless."""

    def __init__(self, allow: Sequence[str] = (), resolver: Resolver = resolve) -> None:
        self.hosts: set[str] = set()
        self.networks: list[Network] = []
        for entry in (e.strip() for e in allow if e.strip()):
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))
        self.resolver = resolver

    def check(self, url: str) -> Target:
        """The checked target of ``url``; ``TargetRefused`` saying why it is refused."""
        scheme, host, port, path = _parts(url)
        addresses = self._addresses(host, port)
        allowed = host in self.hosts or all(self._allowed(a) for a in addresses)
        if scheme != "https" and not allowed:
            raise TargetRefused(
                f"webhook URL {url!r} is not https; plain http is only for hosts the "
                "operator allows (LORAPLEX_WEBHOOK_ALLOW)"
            )
        for address in addresses:
            why = None if allowed or self._allowed(address) else why_refused(address)
            if why is not None:
                # The address itself is not said: it could map the gateway's private DNS.
                verb = "is" if host == str(address) else "resolves to"
                raise TargetRefused(
                    f"webhook host {host!r} {verb} {why}; webhooks go only to public "
                    "addresses unless the operator allows the host (LORAPLEX_WEBHOOK_ALLOW)"
                )
        return Target(url, scheme, host, port, path, addresses)

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)

    def _addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            found = self.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise TargetRefused(f"webhook host {host!r} does not resolve ({exc})") from None
        if not found:
            raise TargetRefused(f"webhook host {host!r} resolves to no address")
        return [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]


def _parts(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path and query) of an acceptable URL."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"webhook URL is {len(url)} characters; at most {MAX_URL_LENGTH}")
    try:
        parts: Any = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"webhook URL {url!r} is malformed ({exc})") from None
    if parts.scheme not in ("https", "http"):
        raise TargetRefused(f"webhook URL {url!r} must be https")
    if not parts.hostname:
        raise TargetRefused(f"webhook URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("webhook URL must not carry credentials; sign-in is by signature")
    if parts.fragment:
        raise TargetRefused(f"webhook URL {url!r} must not have a fragment")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname.lower().rstrip(".")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path
