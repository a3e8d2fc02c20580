"""What a routed model is to the gateway, and what it decided for one request.

Values only (no I/O), so the resolution and the proxy can name them without importing the
engine calls of ``content_routing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import router


@dataclass(frozen=True, slots=True)
class RoutedModel:
    """A routed model's live version, parsed."""

    name: str
    version: int
    policy: router.RoutingPolicy


@dataclass(frozen=True, slots=True)
class RoutedChoice:
    """What a routed model decided for one request (answer headers, metrics, capture)."""

    name: str
    """The routed model's name."""
    version: int
    """The version of its policy that decided."""
    decision: router.RoutingDecision

    def headers(self) -> list[tuple[bytes, bytes]]:
        d = self.decision
        headers = [
            (b"x-loraplex-routed-model", f"{self.name}@{self.version}".encode()),
            (b"x-loraplex-routing-reason", d.reason.value.encode()),
        ]
        if d.label is not None and d.reason is router.RoutingReason.CLASSIFIER:
            headers.append((b"x-loraplex-routing-label", d.label.encode()))
        if d.rule is not None:
            headers.append((b"x-loraplex-routing-rule", str(d.rule).encode()))
        return headers
