"""Finding engine replicas while the gateway runs, so adding one needs no gateway restart.

``engine_discovery`` names where the list of engines comes from:

- ``dns://NAME:PORT``: every address NAME resolves to, each at PORT. On
  Kubernetes NAME is a headless Service (``loraplex-engine-pods``), whose DNS
  answer lists the ready engine pods.
- ``file://PATH``: one engine URL per line (``#`` starts a comment). For
  hosts without service DNS, such as the loopback fleet of ``make fleet``.

The list is re-read every ``DISCOVERY_INTERVAL`` seconds. New engines join
unhealthy and get traffic once their health checks pass; engines that leave
the list stop getting new requests at once (requests already sent finish).
A failed lookup keeps the last good list: a DNS hiccup must not empty the fleet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("loraplex.discovery")

DISCOVERY_INTERVAL = 5.0
"""Seconds between lookups: how long a new replica waits for its first health check at most."""


class DiscoveryError(ValueError):
    """An ``engine_discovery`` value that cannot work; the message says what to write."""


@dataclass(frozen=True)
class Discovery:
    scheme: str
    """``dns`` or ``file``."""
    target: str
    """The DNS name, or the file's path."""
    port: int = 0
    """Engine port, for ``dns``."""

    @classmethod
    def parse(cls, spec: str) -> Discovery:
        parts = urlsplit(spec)
        if parts.scheme == "file":
            path = parts.netloc + parts.path
            if not path:
                raise DiscoveryError(f"{spec!r} names no file; write file:///path/to/engines.txt")
            return cls("file", path)
        if parts.scheme == "dns":
            try:
                port = parts.port
            except ValueError:
                port = None
            if not parts.hostname or not port:
                raise DiscoveryError(
                    f"{spec!r} needs a name and a port, e.g. dns://loraplex-engine-pods:8000"
                )
            return cls("dns", parts.hostname, port)
        raise DiscoveryError(f"{spec!r} is neither dns://NAME:PORT nor file:///PATH")

    async def urls(self) -> list[str]:
        """The engine URLs right now, sorted; raises ``OSError`` if the lookup fails."""
        if self.scheme == "file":
            text = await asyncio.to_thread(Path(self.target).read_text)
            return sorted(set(_file_urls(text)))
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.target, self.port, type=socket.SOCK_STREAM
        )
        return sorted({_http_url(str(info[4][0]), self.port) for info in infos})


def _file_urls(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line.rstrip("/") for line in lines if line]


def _http_url(address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class Change:
    added: list[str]
    removed: list[str]


def diff(current: list[str], found: list[str]) -> Change:
    """What to add and remove to go from ``current`` to ``found`` (order kept)."""
    now, new = set(current), set(found)
    return Change([u for u in found if u not in now], [u for u in current if u not in new])
