"""Routing decisions: which adapter version serves a request, on which engine replica.

Pure decision logic: no I/O, no asyncio, no imports from the other packages.
Time comes in as an argument and randomness as a stable hash, so every
decision is reproducible in a unit test.
"""

from router.content import (
    Classifier,
    InvalidRoutingPolicy,
    RequestText,
    RoutingDecision,
    RoutingPolicy,
    RoutingReason,
    RoutingRule,
    accuracy,
    answer_probability,
    confusion,
    label_text,
)
from router.fairness import PRIORITY_LEVELS, FairQueue, Ticket
from router.health import HealthConfig, ReplicaHealth, Transition
from router.limits import (
    Admission,
    AlreadySettled,
    Denied,
    DenyReason,
    Limiter,
    TenantLimits,
    TokenBucket,
)
from router.names import (
    MAX_MODEL_NAME_LENGTH,
    InvalidModelName,
    ModelRef,
    RefKind,
    parse_model_name,
)
from router.placement import (
    HashRing,
    NoReplica,
    PlacementConfig,
    Placer,
    Policy,
    Replica,
    ReplicaLike,
)
from router.shadow import SHADOW, ShadowTarget, shadow_target
from router.versions import (
    CANARY,
    PINNED,
    PRODUCTION,
    AliasTarget,
    Choice,
    NoServableVersion,
    RoutingView,
    VersionState,
    VersionView,
    canary_bucket,
    choose_version,
)

__all__ = [
    "CANARY",
    "MAX_MODEL_NAME_LENGTH",
    "PINNED",
    "PRIORITY_LEVELS",
    "PRODUCTION",
    "SHADOW",
    "Admission",
    "AliasTarget",
    "AlreadySettled",
    "Choice",
    "Classifier",
    "Denied",
    "DenyReason",
    "FairQueue",
    "HashRing",
    "HealthConfig",
    "InvalidModelName",
    "InvalidRoutingPolicy",
    "Limiter",
    "ModelRef",
    "NoReplica",
    "NoServableVersion",
    "PlacementConfig",
    "Placer",
    "Policy",
    "RefKind",
    "Replica",
    "ReplicaHealth",
    "ReplicaLike",
    "RequestText",
    "RoutingDecision",
    "RoutingPolicy",
    "RoutingReason",
    "RoutingRule",
    "RoutingView",
    "ShadowTarget",
    "TenantLimits",
    "Ticket",
    "TokenBucket",
    "Transition",
    "VersionState",
    "VersionView",
    "accuracy",
    "answer_probability",
    "canary_bucket",
    "choose_version",
    "confusion",
    "label_text",
    "parse_model_name",
    "shadow_target",
]
