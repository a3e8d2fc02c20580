"""What a request's ``model`` resolves to: the :class:`Route` every later step reads.

``model`` names a base some engine serves, or one of the caller's adapters (alias, canary
split, pin); anything else, a foreign name and every name in the LoRA
namespace included, is the same 404, so nothing reveals what other tenants own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import router
from registry import lora_names
from server.errors import APIError, model_not_found
from server.gateway.routed import RoutedChoice, RoutedModel
from server.gateway.tenancy import Caller, Tenancy

RawHeaders = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class ServedVersion:
    """The adapter version a request resolved to."""

    adapter: str
    """The adapter's name (the tenant's own)."""
    number: int
    """The version number."""
    lora_name: str
    """The name the engines load it under (``registry.lora_names``)."""
    label: str
    """How it was chosen: production, canary, pinned or an alias name."""


@dataclass(frozen=True, slots=True)
class Route:
    """A resolved request: what to ask which base's engines for, and what to show the client."""

    requested_model: str
    """The ``model`` string the client sent; answers echo it."""
    tenant: str
    """The caller's tenant name (metric labels)."""
    base_fingerprint: str
    """The base whose engines may serve it; placement never crosses bases."""
    engine_model: str
    """The model the engine is asked for: the base's served name or the version's LoRA name."""
    version: ServedVersion | None = None
    """The adapter version; None when the base model itself was asked for."""
    shadow: router.ShadowTarget | None = None
    """The candidate that may get a copy of this request (a production request of an
    adapter with a ``shadow`` alias: ``server.gateway.shadow``)."""
    routed: RoutedChoice | None = None
    """What the routed model the client named decided, when it named one."""

    @property
    def lora_name(self) -> str | None:
        return self.version.lora_name if self.version else None

    @property
    def adapter_label(self) -> str:
        return self.version.adapter if self.version else ""

    @property
    def version_label(self) -> str:
        return str(self.version.number) if self.version else ""

    def hide(self, data: bytes) -> bytes:
        """``data`` from the engine with the LoRA name replaced by the requested model."""
        if self.version is None:
            return data
        return lora_names.hide(data, self.version.lora_name, self.requested_model)

    def headers(self) -> RawHeaders:
        """The adapter (and routing) headers of an answer, as ASGI raw headers."""
        routed = self.routed.headers() if self.routed is not None else []
        if self.version is None:
            return routed
        return [
            (b"x-loraplex-adapter", self.version.adapter.encode()),
            (b"x-loraplex-version", str(self.version.number).encode()),
            (b"x-loraplex-route", self.version.label.encode()),
            *routed,
        ]


NO_ENGINE = "No healthy engine serves this model's base right now; retry in a few seconds."
"""The one wording of "no engine can take it now" (inference's placement says it too)."""


def base_unreachable() -> APIError:
    """A registered base that an engine not yet reachable may serve: retry, not 404."""
    return APIError(503, NO_ENGINE, code="no_engine", headers={"Retry-After": "5"})


def routed_target_gone(model: str, target: str) -> APIError:
    """A routed model chose a target (the tenant's own) that no longer serves."""
    return APIError(
        404,
        f"The routed model `{model}` chose `{target}` for this request, which has no "
        f"servable version now; restore `{target}` or save a routed-model version "
        "that does not use it.",
        code="routed_target_not_found",
        param="model",
    )


class RoutedModels(Protocol):
    """What the resolver uses of ``content_routing.ContentRouter`` (which reaches engines
    through the proxy, and the proxy imports this module)."""

    async def routed_model(self, tenant_id: int, name: str) -> RoutedModel | None: ...

    async def names(self, tenant_id: int) -> list[str]: ...

    async def decide(
        self, caller: Caller, routed: RoutedModel, text: router.RequestText
    ) -> router.RoutingDecision: ...


class Resolver:
    """Turns ``(caller, body)`` into a :class:`Route` from the cached registry view."""

    def __init__(
        self,
        tenancy: Tenancy,
        bases: Mapping[str, str],
        unidentified: Callable[[], bool],
        content: RoutedModels | None = None,
    ) -> None:
        self.tenancy = tenancy
        self.content = content
        """Routed models' decisions (None: no routed models, as in narrow unit tests)."""
        self.bases = bases
        """Served name -> fingerprint of the bases engines serve (``Replicas.bases``, live)."""
        self.unidentified = unidentified
        """Whether some engine's base is not known yet (it has not answered since the
        gateway started): any registered base may be the one it serves."""

    async def resolve(self, caller: Caller, body: dict[str, Any]) -> Route:
        return await self._resolve(caller, body["model"], body, routing=True)

    async def _resolve(
        self, caller: Caller, model: str, body: dict[str, Any], *, routing: bool
    ) -> Route:
        """``model`` resolved for ``body``; a routed model's only when ``routing``, so a
        routed model's target is never itself routed."""
        try:
            ref = router.parse_model_name(model, self.bases)
        except router.InvalidModelName:
            raise model_not_found(model) from None
        if ref.kind is router.RefKind.BASE:
            return Route(model, caller.tenant_name, self.bases[model], model)
        if lora_names.in_namespace(ref.name):
            raise model_not_found(model)  # engine-side names are never for clients
        view = await self.tenancy.routing(caller.tenant_id, ref.name)
        if view is None:
            routed = await self._routed_model(caller, ref) if routing else None
            if routed is not None:
                return await self._routed(caller, model, body, routed)
            if ref.kind is router.RefKind.ADAPTER and await self._maybe_served(ref.name):
                raise base_unreachable()
            raise model_not_found(model)
        user = body.get("user")
        sticky = user if isinstance(user, str) and user else f"key:{caller.principal.key_id}"
        choice = _choose(view, ref, sticky)
        if choice is None and (newer := await self._newer(caller, ref, view)) is not None:
            view, choice = newer, _choose(newer, ref, sticky)
        if choice is None:
            raise model_not_found(model)
        chosen = choice.version
        version = ServedVersion(ref.name, chosen.number, chosen.lora_name, choice.label)
        shadow = router.shadow_target(view, choice) if router.SHADOW in view.aliases else None
        return Route(
            model, caller.tenant_name, chosen.base_fingerprint, chosen.lora_name, version, shadow
        )

    async def _routed_model(self, caller: Caller, ref: router.ModelRef) -> RoutedModel | None:
        if self.content is None or ref.kind is not router.RefKind.ADAPTER:
            return None
        return await self.content.routed_model(caller.tenant_id, ref.name)

    async def _routed(
        self, caller: Caller, model: str, body: dict[str, Any], routed: RoutedModel
    ) -> Route:
        """The route of the target the routed model's policy chooses for this request."""
        assert self.content is not None
        decision = await self.content.decide(caller, routed, router.RequestText.of(body))
        try:
            route = await self._resolve(caller, decision.target, body, routing=False)
        except APIError as exc:
            if exc.status != 404:
                raise
            raise routed_target_gone(model, decision.target) from None
        choice = RoutedChoice(routed.name, routed.version, decision)
        return dataclasses.replace(route, requested_model=model, routed=choice)

    async def _newer(
        self, caller: Caller, ref: router.ModelRef, view: router.RoutingView
    ) -> router.RoutingView | None:
        """The adapter's view read again when ``ref`` pins a version newer than the cached
        view knows (pushed since it was read), else None."""
        known = max(view.versions, default=0)
        if ref.kind is not router.RefKind.PINNED or ref.version is None or ref.version <= known:
            return None
        return await self.tenancy.routing_now(caller.tenant_id, ref.name)

    async def _maybe_served(self, name: str) -> bool:
        return self.unidentified() and name in await self.tenancy.registered_base_names()


def _choose(view: router.RoutingView, ref: router.ModelRef, sticky: str) -> router.Choice | None:
    """The version ``ref`` resolves to in ``view``; None when none is servable there."""
    try:
        return router.choose_version(view, ref, sticky)
    except router.NoServableVersion:
        return None
