"""Routing decisions: which adapter version serves a request, on which engine replica.

Pure decision logic: no I/O, no asyncio, no imports from the other packages.
Time comes in as an argument and randomness as a stable hash, so every
decision is reproducible in a unit test.
"""

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
    "Denied",
    "DenyReason",
    "FairQueue",
    "HashRing",
    "HealthConfig",
    "InvalidModelName",
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
    "RoutingView",
    "ShadowTarget",
    "TenantLimits",
    "Ticket",
    "TokenBucket",
    "Transition",
    "VersionState",
    "VersionView",
    "canary_bucket",
    "choose_version",
    "parse_model_name",
    "shadow_target",
]
