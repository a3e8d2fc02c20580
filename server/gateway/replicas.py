"""Engine replicas as the gateway sees them, their health, and placement over them.

An :class:`Engine` is one vLLM replica: its address, its base, its load, the
adapters it likely holds, and one ``router.ReplicaHealth`` state machine. That
state machine is the only writer of the replica's health: the proxy reports
requests that could not reach it, the health watcher (or the supervisor, for
engines ``serve`` started) reports probes, and everyone else only reads
``Engine.healthy``. :class:`Replicas` is the set the gateway sends to.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import router

log = logging.getLogger("loraplex.engine")

EXTERNAL_HEALTH = router.HealthConfig(eject_after=2, readmit_after=2, probe_interval=1.0)
"""Engines the gateway did not start: ejected after 2 failed probes a second apart,
readmitted after 2 good ones."""
SUPERVISED_HEALTH = router.HealthConfig(eject_after=1, readmit_after=1, probe_interval=1.0)
"""Engines ``serve`` started: their supervisor probes every second and restarts the process
after 10 failures, so each probe decides on its own."""


@dataclass
class Engine:
    """One engine replica as the gateway sees it."""

    url: str
    """Base URL, e.g. ``http://127.0.0.1:8100``."""

    base_fingerprint: str = ""
    """Registry fingerprint of the base it serves; the router never crosses bases. Empty
    until known: engines the gateway did not start are asked (``bases.identify``)."""

    base_name: str = ""
    """The name it serves that base under (its ``--served-model-name``): what clients ask for."""

    health_config: router.HealthConfig = EXTERNAL_HEALTH
    """When it is ejected and readmitted."""

    in_flight: int = 0
    """Requests proxied to it right now."""

    resident_limit: int = 16
    """How many adapters the engine keeps loaded (its ``--max-cpu-loras``)."""

    health: router.ReplicaHealth = field(init=False)
    _resident: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        # Unhealthy until probes say otherwise: a new replica may still be loading its model.
        self.health = router.ReplicaHealth(self.health_config, time.monotonic(), healthy=False)

    @property
    def name(self) -> str:
        return self.url.removeprefix("http://").removeprefix("https://")

    @property
    def id(self) -> str:
        return self.url

    @property
    def healthy(self) -> bool:
        """Whether requests may be sent to it."""
        return self.health.healthy

    def serves(self, base_name: str, base_fingerprint: str) -> None:
        """What ``bases.identify`` found this engine serves."""
        self.base_name, self.base_fingerprint = base_name, base_fingerprint

    def report_probe(self, ok: bool) -> None:
        """A health probe's result (from the watcher or the supervisor)."""
        self._log(self.health.record_probe(ok, time.monotonic()))

    def report_unreachable(self) -> None:
        """A request could not reach it; it gets no more until probes readmit it."""
        self._log(self.health.record_unreachable(time.monotonic()))

    def _log(self, transition: router.Transition | None) -> None:
        if transition is not None:
            log.warning("engine %s is now %s", self.url, "up" if self.healthy else "down")

    @property
    def resident(self) -> OrderedDict[str, None]:
        """Adapters this gateway last served there, most recent last: the engine's likely LRU."""
        return self._resident

    def served(self, lora_name: str) -> None:
        self._resident[lora_name] = None
        self._resident.move_to_end(lora_name)
        while len(self._resident) > self.resident_limit:
            self._resident.popitem(last=False)


class Replicas:
    """The engines this gateway sends to (discovery may change them), and the placement.

    Placement itself is pure (``router.Placer``); this holds the live objects it orders.
    """

    def __init__(self, placer: router.Placer, resident_limit: int) -> None:
        self.placer = placer
        self.resident_limit = resident_limit
        self.engines: list[Engine] = []
        self.bases: dict[str, str] = {}
        """Served name -> fingerprint of every base some engine here serves (healthy or not):
        the names the resolver accepts. Updated in place, never replaced."""

    def add(self, engine: Engine) -> None:
        """Send traffic to ``engine`` once healthy and its base is known."""
        engine.resident_limit = self.resident_limit
        self.engines.append(engine)
        self.update_bases()

    def remove(self, urls: set[str]) -> list[Engine]:
        """Stop sending to the engines at ``urls`` (requests in flight finish); the removed."""
        gone = [e for e in self.engines if e.url in urls]
        self.engines[:] = [e for e in self.engines if e.url not in urls]
        self.update_bases()
        return gone

    def update_bases(self) -> None:
        """Recompute ``bases`` after an engine joined, left or was identified."""
        served = {e.base_name: e.base_fingerprint for e in self.engines if e.base_fingerprint}
        if served != self.bases:
            self.bases.clear()
            self.bases.update(served)

    def unidentified(self) -> bool:
        """Whether some engine's base is still unknown (it has not answered yet)."""
        return any(not e.base_fingerprint for e in self.engines)

    def of_base(self, base_fingerprint: str) -> list[Engine]:
        return [e for e in self.engines if e.base_fingerprint == base_fingerprint]

    def healthy_count(self) -> int:
        """Engines that may take requests: healthy, and their base known."""
        return sum(e.healthy and bool(e.base_fingerprint) for e in self.engines)

    def candidates(self, base_fingerprint: str, lora_name: str | None) -> list[Engine]:
        """Healthy engines of the base, preferred first; raises ``router.NoReplica``."""
        return self.placer.candidates(self.engines, base_fingerprint, lora_name)
