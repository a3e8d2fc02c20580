"""Which candidate version gets a copy of a production request (the ``shadow`` alias).

The alias's weight is the share of production requests copied. A copy is only worth
sending to a servable version other than production on production's base: an alias
left pointing at a version since promoted, withdrawn or on another base copies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.versions import PRODUCTION, Choice, RoutingView, VersionView

SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """Where copies of a production request go, and how many of them."""

    version: VersionView
    """The candidate version."""
    share: float
    """Share of production requests copied to it, in (0, 1]."""


def shadow_target(view: RoutingView, choice: Choice) -> ShadowTarget | None:
    """The candidate a request ``choice`` resolved for gets copies of, if any."""
    if choice.label != PRODUCTION:
        return None
    alias = view.aliases.get(SHADOW)
    if alias is None or alias.weight <= 0.0:
        return None
    candidate = view.versions.get(alias.version)
    served = choice.version
    if candidate is None or not candidate.servable or candidate.number == served.number:
        return None
    if candidate.base_fingerprint != served.base_fingerprint:
        return None
    return ShadowTarget(candidate, alias.weight)
