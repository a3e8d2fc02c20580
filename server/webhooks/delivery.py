"""The webhook deliverer: an asyncio loop each gateway runs beside its app.

Each round it fans the event log out into the delivery queue, claims the deliveries
that are due under a lease (``registry.webhooks``: two gateways never send the same
attempt), and sends each one: the event's JSON, signed (``signing``), posted to an
address the SSRF guard checked just now, with a timeout and no redirects followed.
A 2xx answer delivers it; anything else (another status, a refused or unreachable
target, a timeout) is a failed attempt the store schedules again or marks dead. The
registry's calls block, so they run in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

import httpx

from registry.webhooks import Backoff, Claimed, WebhookStore
from server.webhooks import signing
from server.webhooks.ssrf import Guard, TargetRefused

log = logging.getLogger("loraplex.webhooks")
BATCH = 16
USER_AGENT = "loraplex-webhooks/1"


@dataclass(frozen=True)
class Outcome:
    status: int | None
    error: str | None


class Deliverer:
    """Sends the due webhook messages, round after round, until cancelled."""

    def __init__(
        self,
        store: WebhookStore,
        guard: Guard,
        backoff: Backoff,
        timeout: float,
        interval: float,
        owner: str | None = None,
    ) -> None:
        self.store, self.guard, self.backoff = store, guard, backoff
        self.timeout, self.interval = timeout, interval
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # Long enough to outlast an attempt's timeout, so a lease never lapses mid-send.
        self.lease = dt.timedelta(seconds=max(30.0, 3 * timeout))

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
            while True:
                try:
                    sent = await self.round(client)
                except Exception:  # the database may be down: log it, try again later
                    log.exception("webhook delivery round failed")
                    sent = 0
                if sent < BATCH:
                    await asyncio.sleep(self.interval)

    async def round(self, client: httpx.AsyncClient) -> int:
        """One round: fan out, claim, send; the number of attempts made."""
        await asyncio.to_thread(self.store.fan_out)
        claimed = await asyncio.to_thread(self.store.claim, self.owner, self.lease, BATCH)
        await asyncio.gather(*(self.attempt(client, c) for c in claimed))
        return len(claimed)

    async def attempt(self, client: httpx.AsyncClient, claimed: Claimed) -> None:
        outcome = await self.send(client, claimed)
        state = await asyncio.to_thread(
            self.store.finish, claimed.delivery_id, self.owner, self.backoff,
            outcome.status, outcome.error,
        )  # fmt: skip
        log.info(
            "webhook %s attempt %d to %s: %s -> %s", claimed.delivery_id, claimed.attempt,
            claimed.url, outcome.status or outcome.error, state,
        )  # fmt: skip

    async def send(self, client: httpx.AsyncClient, claimed: Claimed) -> Outcome:
        try:
            target = await asyncio.to_thread(self.guard.check, claimed.url)
        except TargetRefused as exc:
            return Outcome(None, f"refused: {exc}")
        body = json.dumps(claimed.event.to_json(), separators=(",", ":")).encode()
        headers = signing.headers(claimed.secrets, claimed.delivery_id, int(time.time()), body)
        headers |= {"host": target.host_header(), "user-agent": USER_AGENT}
        # SNI and certificate checks use the name; the connection goes to the checked address.
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            response = await client.post(
                target.connect_url(target.addresses[0]), content=body, headers=headers,
                extensions=extensions,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:512])
        if 200 <= response.status_code < 300:
            return Outcome(response.status_code, None)
        return Outcome(response.status_code, f"HTTP {response.status_code}")
