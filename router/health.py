"""Per-replica health: eject after N consecutive failures, readmit after M good probes.

Failures are request errors, timeouts and failed probes alike. While a replica
is ejected no request reaches it, so only probes can bring it back; a request
result reported late for an ejected replica changes nothing. The clock comes in
as an argument (seconds, any monotonic origin).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Transition(StrEnum):
    """A change of a replica's health, for logs and metrics."""

    EJECTED = "ejected"
    READMITTED = "readmitted"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """When replicas are ejected and readmitted."""

    eject_after: int = 3
    """Consecutive failures (errors, timeouts, failed probes) that eject a healthy replica."""
    readmit_after: int = 2
    """Consecutive successful probes that readmit an ejected replica."""
    probe_interval: float = 5.0
    """Seconds between probes of a replica (healthy or not)."""

    def __post_init__(self) -> None:
        if self.eject_after < 1 or self.readmit_after < 1:
            raise ValueError(
                f"eject_after ({self.eject_after}) and readmit_after ({self.readmit_after}) "
                "must be at least 1"
            )
        if self.probe_interval <= 0:
            raise ValueError(f"probe_interval {self.probe_interval} must be positive seconds")


class ReplicaHealth:
    """The health state machine of one replica. Not locked: one asyncio loop."""

    __slots__ = ("_failures", "_successes", "changed_at", "config", "healthy", "last_probe_at")

    def __init__(self, config: HealthConfig, now: float, healthy: bool = True) -> None:
        self.config = config
        self.healthy = healthy
        """Whether requests may be sent to the replica."""
        self.changed_at = now
        """When ``healthy`` last changed (or the tracker was created)."""
        self.last_probe_at: float | None = None
        """When the last probe result was recorded."""
        self._failures = 0
        self._successes = 0

    def record_request(self, ok: bool, now: float) -> Transition | None:
        """Record a proxied request's outcome (a timeout counts as not ok)."""
        if not self.healthy:
            return None  # sent before the ejection; only probes decide readmission
        return self._outcome(ok, now)

    def record_unreachable(self, now: float) -> Transition | None:
        """Record that a request could not reach the replica at all (connection refused,
        reset or timed out before any answer): it is ejected at once, since every further
        request would only wait for the same failure; probes readmit it as usual."""
        if not self.healthy:
            return None
        return self._set(False, now)

    def record_probe(self, ok: bool, now: float) -> Transition | None:
        """Record a health probe's outcome."""
        self.last_probe_at = now
        return self._outcome(ok, now)

    def probe_due(self, now: float) -> bool:
        """Whether it is time to probe this replica again."""
        return self.last_probe_at is None or now - self.last_probe_at >= self.config.probe_interval

    def _outcome(self, ok: bool, now: float) -> Transition | None:
        if ok:
            self._failures = 0
            self._successes += 1
            if not self.healthy and self._successes >= self.config.readmit_after:
                return self._set(True, now)
            return None
        self._successes = 0
        self._failures += 1
        if self.healthy and self._failures >= self.config.eject_after:
            return self._set(False, now)
        return None

    def _set(self, healthy: bool, now: float) -> Transition:
        self.healthy = healthy
        self.changed_at = now
        self._failures = 0
        self._successes = 0
        return Transition.READMITTED if healthy else Transition.EJECTED
