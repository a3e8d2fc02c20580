"""loraplex registry: the system of record for adapters, versions, base models and tenants.

Public surface: ``Registry`` (the facade), the blob stores, ``UploadLimits``,
the value types and the errors. Nothing here knows about HTTP or engines.
"""

from registry.blobs import BlobStore, LocalBlobStore, S3BlobStore, open_blob_store
from registry.errors import (
    DATABASE_DOWN,
    AdapterRejected,
    Conflict,
    CorruptBlob,
    GateFailed,
    InvalidLimits,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RegistryError,
)
from registry.gates import Gate
from registry.limits import UploadLimits
from registry.lora_names import lora_name
from registry.models import (
    ADMIN_SCOPE,
    CANARY,
    PRODUCTION,
    SHADOW,
    TENANT_SCOPE,
    Adapter,
    AdapterVersion,
    ApiKey,
    AuditEvent,
    BaseModelRecord,
    EvalResult,
    Tenant,
    Usage,
)
from registry.registry import Registry
from registry.routed_models import (
    ROUTING_SUITE,
    LiveRoutedModel,
    RoutedModelInfo,
    RoutedModelStore,
    RoutedVersion,
    RoutingEval,
    RoutingGate,
)
from registry.tenancy import tenant_ref
from registry.values import (
    Actor,
    AliasTarget,
    Principal,
    Provenance,
    RoutingView,
    TenantLimits,
    VersionBlob,
)

__all__ = [
    "ADMIN_SCOPE",
    "CANARY",
    "DATABASE_DOWN",
    "PRODUCTION",
    "ROUTING_SUITE",
    "SHADOW",
    "TENANT_SCOPE",
    "Actor",
    "Adapter",
    "AdapterRejected",
    "AdapterVersion",
    "AliasTarget",
    "ApiKey",
    "AuditEvent",
    "BaseModelRecord",
    "BlobStore",
    "Conflict",
    "CorruptBlob",
    "EvalResult",
    "Gate",
    "GateFailed",
    "InvalidLimits",
    "InvalidRequest",
    "LiveRoutedModel",
    "LocalBlobStore",
    "NotFound",
    "PermissionDenied",
    "Principal",
    "Provenance",
    "Registry",
    "RegistryError",
    "RoutedModelInfo",
    "RoutedModelStore",
    "RoutedVersion",
    "RoutingEval",
    "RoutingGate",
    "RoutingView",
    "S3BlobStore",
    "Tenant",
    "TenantLimits",
    "UploadLimits",
    "Usage",
    "VersionBlob",
    "lora_name",
    "open_blob_store",
    "tenant_ref",
]
