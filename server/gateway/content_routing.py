"""Routed models on the hot path: which of a tenant's adapters a request for one goes to.

A request whose ``model`` is one of the tenant's routed models (``registry.routed_models``)
gets a decision from the live version's policy (``router.content``): its rules first (pure,
microseconds), then, when none matched and the policy has one, its classifier: one short
engine call to the tenant's classifier adapter (greedy, ``max_tokens`` of a label, logprobs
when the policy sets a confidence floor), whose answer the policy maps to a target. A label
is reused for an identical prompt for the policy's ``cache_seconds``, so a repeated
question costs no second call.

A classifier that cannot answer (no healthy engine, an engine error, its adapter gone)
falls back to the default target, counted, rather than failing the request: routing then
degrades to the default, as an unusable label does. Its tokens are the tenant's usage of
the classifier adapter, like any request's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import orjson

import router
from registry import Principal
from registry.routed_models import RoutedModelStore
from server.errors import APIError
from server.gateway.forwarding import Forwarder
from server.gateway.metrics import Metrics
from server.gateway.proxy import TokenUsage, UpstreamError, UpstreamFailure
from server.gateway.replicas import Replicas
from server.gateway.routed import RoutedModel
from server.gateway.tenancy import (
    MISS,
    REGISTRY_MAX_AGE,
    REGISTRY_TTL,
    Caller,
    Tenancy,
    TTLCache,
    UsageBook,
)

log = logging.getLogger("loraplex.content_routing")

CHAT = "/v1/chat/completions"
MAX_CACHED_LABELS = 10_000
"""Classifier decisions kept for identical prompts, at most (oldest dropped first)."""

ANSWERED = "answered"
CACHED = "cached"
FAILED = "failed"


class UnreadablePolicy(RuntimeError):
    """A stored policy this gateway cannot parse (written by a newer release, say)."""


class ContentRouter:
    """Live routed models (cached like the rest of the registry view) and their decisions."""

    def __init__(
        self,
        store: RoutedModelStore,
        tenancy: Tenancy,
        replicas: Replicas,
        forwarder: Forwarder,
        usage: UsageBook,
    ) -> None:
        self.store = store
        self.tenancy = tenancy
        self.replicas = replicas
        self.forwarder = forwarder
        self.metrics: Metrics = forwarder.metrics
        self.usage = usage
        self._live = TTLCache(self._load, REGISTRY_TTL, REGISTRY_MAX_AGE)
        self._names = TTLCache(self._load_names, REGISTRY_TTL, REGISTRY_MAX_AGE)
        self._labels: OrderedDict[tuple[int, str, int, str], tuple[float, str, float | None]]
        self._labels = OrderedDict()

    async def routed_model(self, tenant_id: int, name: str) -> RoutedModel | None:
        """The tenant's routed model ``name`` as it is live now; None if it has none."""
        hit = self._live.fresh((tenant_id, name))
        try:
            return hit if hit is not MISS else await self._live.load((tenant_id, name))
        except UnreadablePolicy as exc:
            log.error("%s", exc)
            raise APIError(
                503,
                f"The routed model `{name}`'s live policy cannot be read by this gateway; "
                "retry shortly, or roll the routed model back to a version it can read.",
                code="routed_model_unreadable",
                headers={"Retry-After": "30"},
            ) from None

    async def _load(self, key: tuple[int, str]) -> RoutedModel | None:
        live = await asyncio.to_thread(self.store.live, *key)
        if live is None:
            return None
        try:
            policy = router.RoutingPolicy.from_json(live.policy)
        except router.InvalidRoutingPolicy as exc:
            raise UnreadablePolicy(f"routed model {live.name!r} v{live.version}: {exc}") from exc
        return RoutedModel(live.name, live.version, policy)

    async def names(self, tenant_id: int) -> list[str]:
        """The names of the tenant's routed models that have a live version (``/v1/models``)."""
        return await self._names.get(tenant_id)

    async def _load_names(self, tenant_id: int) -> list[str]:
        listed = await asyncio.to_thread(self.store.list, tenant_id)
        return [m.name for m in listed if m.live_version is not None]

    async def evaluate(
        self,
        principal: Principal,
        tenant_name: str,
        name: str,
        version: int,
        policy: router.RoutingPolicy,
        texts: Sequence[router.RequestText],
    ) -> list[router.RoutingDecision]:
        """The decisions a version of a routed model makes for ``texts``, as requests get
        them (a routing eval, a replay); not counted in the decision metrics."""
        assert principal.tenant_id is not None
        caller = Caller(principal, principal.tenant_id, tenant_name)
        routed = RoutedModel(name, version, policy)
        return [await self.decide(caller, routed, text, counted=False) for text in texts]

    async def decide(
        self,
        caller: Caller,
        routed: RoutedModel,
        text: router.RequestText,
        *,
        counted: bool = True,
    ) -> router.RoutingDecision:
        """Where this request goes: rules, then the classifier, then the default."""
        policy = routed.policy
        decision = policy.by_rules(text)
        if decision is None:
            if policy.classifier is None:
                decision = policy.default_decision()
            else:
                decision = await self._classify(caller, routed, text)
        if not counted:
            return decision
        m = self.metrics
        label = decision.label if decision.reason is router.RoutingReason.CLASSIFIER else ""
        m.routing_decisions_of(
            caller.tenant_name, routed.name, decision.reason.value, label or "", decision.target
        ).inc()
        return decision

    async def _classify(
        self, caller: Caller, routed: RoutedModel, text: router.RequestText
    ) -> router.RoutingDecision:
        classifier = routed.policy.classifier
        assert classifier is not None
        key = (caller.tenant_id, routed.name, routed.version, _digest(text.last_user))
        cached = self._labels.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < classifier.cache_seconds:
            self.metrics.routing_classifier_seconds_of(CACHED).observe(time.monotonic() - now)
            return routed.policy.by_label(cached[1], cached[2])
        try:
            answer, confidence = await self._ask(caller, routed, text)
        except _ClassifierUnavailable as exc:
            log.warning("routed model %r: no classifier answer (%s)", routed.name, exc)
            self.metrics.routing_classifier_seconds_of(FAILED).observe(time.monotonic() - now)
            return router.RoutingDecision(routed.policy.default, router.RoutingReason.FALLBACK)
        self.metrics.routing_classifier_seconds_of(ANSWERED).observe(time.monotonic() - now)
        if classifier.cache_seconds > 0:
            self._remember(key, (time.monotonic(), answer, confidence))
        return routed.policy.by_label(answer, confidence)

    def _remember(
        self, key: tuple[int, str, int, str], value: tuple[float, str, float | None]
    ) -> None:
        self._labels[key] = value
        self._labels.move_to_end(key)
        while len(self._labels) > MAX_CACHED_LABELS:
            self._labels.popitem(last=False)

    async def _ask(
        self, caller: Caller, routed: RoutedModel, text: router.RequestText
    ) -> tuple[str, float | None]:
        """The classifier's answer text and, when asked for, its probability."""
        classifier = routed.policy.classifier
        assert classifier is not None
        version = await self._classifier_version(caller, classifier.adapter)
        wants_logprobs = classifier.min_confidence is not None
        body = {
            "model": version.lora_name,
            "messages": routed.policy.classifier_messages(text),
            "max_tokens": classifier.max_tokens,
            "temperature": 0.0,
            "logprobs": wants_logprobs,
        }
        try:
            candidates = self.replicas.candidates(version.base_fingerprint, version.lora_name)
            status, content, engine = await self.forwarder.ask(candidates, CHAT, body)
        except router.NoReplica:
            raise _ClassifierUnavailable("no healthy engine serves its base") from None
        except (UpstreamFailure, *UpstreamError) as exc:
            raise _ClassifierUnavailable(f"its engine failed: {exc!r}") from None
        if status != 200:
            raise _ClassifierUnavailable(f"its engine answered HTTP {status}")
        engine.served(version.lora_name)
        answer, logprobs, usage = _read_answer(content)
        if usage is not None:
            self.usage.add(
                caller.tenant_id,
                classifier.adapter,
                version.number,
                usage.prompt_tokens,
                usage.completion_tokens,
            )
        confidence = router.answer_probability(logprobs) if wants_logprobs and logprobs else None
        return answer, confidence

    async def _classifier_version(self, caller: Caller, adapter: str) -> router.VersionView:
        view = await self.tenancy.routing(caller.tenant_id, adapter)
        if view is None:
            raise _ClassifierUnavailable(f"adapter {adapter!r} no longer exists")
        ref = router.ModelRef(router.RefKind.ADAPTER, adapter)
        sticky = f"key:{caller.principal.key_id}"
        try:
            return router.choose_version(view, ref, sticky).version
        except router.NoServableVersion:
            raise _ClassifierUnavailable(f"adapter {adapter!r} has no servable version") from None


class _ClassifierUnavailable(Exception):
    """The classifier gave no answer; the default target is used."""


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _read_answer(content: bytes) -> tuple[str, list[float], TokenUsage | None]:
    """(the first choice's text, its tokens' logprobs, usage) of a chat answer."""
    try:
        payload = orjson.loads(content)
        choice = payload["choices"][0]
        text = choice["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise _ClassifierUnavailable("its answer holds no message") from None
    tokens = ((choice.get("logprobs") or {}).get("content")) or []
    logprobs = [float(t["logprob"]) for t in tokens if isinstance(t, dict) and "logprob" in t]
    return str(text), logprobs, TokenUsage.of(payload)
