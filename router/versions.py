"""Choose the adapter version that serves a request.

A bare adapter name resolves alias ``production``, unless alias ``canary``
carries a weight w > 0: then a stable hash of (adapter, stickiness key) sends
about w of the keys to the canary, each key always to the same side. The hash
is blake2b, not Python's ``hash()``, so every gateway process agrees and a
restart moves nobody. Raising w only moves keys onto the canary, never back.
Pinned versions (``@N``) and explicit aliases (``:alias``) bypass the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from router.names import ModelRef, RefKind

PRODUCTION = "production"
CANARY = "canary"
PINNED = "pinned"

_HASH_BYTES = 8
_HASH_SPACE = float(1 << (8 * _HASH_BYTES))


class NoServableVersion(LookupError):
    """No servable version matches the request; the gateway answers it as an unknown model."""


class VersionState(StrEnum):
    """Lifecycle state of an adapter version, as the registry records it."""

    ACTIVE = "active"
    ARCHIVED = "archived"
    RETIRED = "retired"


@dataclass(frozen=True, slots=True)
class VersionView:
    """One version of an adapter, as the router needs to see it."""

    number: int
    """Version number, 1 upwards."""
    lora_name: str
    """The name engines load this version under (the registry mints it)."""
    base_fingerprint: str
    """Fingerprint of the base model this version is pinned to."""
    state: VersionState = VersionState.ACTIVE
    """Only ``ACTIVE`` versions are ever chosen."""

    @property
    def servable(self) -> bool:
        return self.state is VersionState.ACTIVE


@dataclass(frozen=True, slots=True)
class AliasTarget:
    """Where an alias points."""

    version: int
    """The version number the alias names."""
    weight: float = 1.0
    """Share of bare-name traffic (meaningful for ``canary`` only), 0..1."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(
                f"alias weight {self.weight} is outside 0..1; pass a share such as 0.1"
            )


@dataclass(frozen=True, slots=True)
class RoutingView:
    """Everything needed to resolve one adapter's name: its versions and aliases."""

    adapter: str
    """The adapter's name (part of the canary hash, so adapters split independently)."""
    versions: Mapping[int, VersionView]
    """Version number -> version."""
    aliases: Mapping[str, AliasTarget]
    """Alias name -> target."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The version chosen for a request and why."""

    version: VersionView
    """The version to serve."""
    label: str
    """``production``, ``canary``, ``pinned`` or the explicit alias's name."""


def choose_version(view: RoutingView, ref: ModelRef, stickiness_key: str) -> Choice:
    """Pick the version of ``view.adapter`` that serves a request for ``ref``.

    ``stickiness_key`` is the request's ``user`` field, else an API-key or request key.

    Raises:
        NoServableVersion: the version or alias does not exist or is retired/archived.
        ValueError: ``ref`` names no adapter version (it names a base).
    """
    if ref.kind is RefKind.PINNED and ref.version is not None:
        return Choice(_servable(view, ref.version, f"version {ref.version}"), PINNED)
    if ref.kind is RefKind.ALIAS and ref.alias is not None:
        return Choice(_via_alias(view, ref.alias), ref.alias)
    if ref.kind is RefKind.ADAPTER:
        return _split(view, stickiness_key)
    raise ValueError(f"{ref.kind} reference {ref.name!r} names no adapter version")


def canary_bucket(adapter: str, stickiness_key: str) -> float:
    """The key's stable position in [0, 1): keys below the canary weight go to the canary."""
    digest = hashlib.blake2b(
        f"{adapter}\x00{stickiness_key}".encode(), digest_size=_HASH_BYTES
    ).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE


def _split(view: RoutingView, stickiness_key: str) -> Choice:
    production = _via_alias(view, PRODUCTION)
    canary = view.aliases.get(CANARY)
    if canary is None or canary.weight <= 0.0:
        return Choice(production, PRODUCTION)
    if canary_bucket(view.adapter, stickiness_key) >= canary.weight:
        return Choice(production, PRODUCTION)
    candidate = view.versions.get(canary.version)
    if candidate is None or not candidate.servable:
        # A canary on a withdrawn version must not fail requests that production can serve.
        return Choice(production, PRODUCTION)
    return Choice(candidate, CANARY)


def _via_alias(view: RoutingView, alias: str) -> VersionView:
    target = view.aliases.get(alias)
    if target is None:
        raise NoServableVersion(
            f"adapter {view.adapter!r} has no alias {alias!r}; "
            "promote a version or request one as 'adapter@N'"
        )
    return _servable(view, target.version, f"alias {alias!r} (version {target.version})")


def _servable(view: RoutingView, number: int, what: str) -> VersionView:
    version = view.versions.get(number)
    if version is None or not version.servable:
        raise NoServableVersion(
            f"adapter {view.adapter!r} has no servable {what}; "
            "list its versions and request an active one"
        )
    return version
