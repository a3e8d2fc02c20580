"""The Python client of a loraplex gateway, for customers holding a tenant key.

It owns the tenant REST API over HTTP (httpx, nothing else of loraplex): adapters (push
with progress, versions, aliases, evals, gates), training files, fine-tuning jobs (events
followed live, checkpoints) and usage. It never touches the registry database; the
operator commands (tenants, keys, bases, migrate) do, and stay out of it.

    from server.client import LoraplexClient

    with LoraplexClient("http://localhost:8000", api_key) as client:
        version = client.push_adapter("out/peft", "support-bot", base="demo-base")
        client.promote("support-bot", version.version)

Every failure raises ``LoraplexError`` with the gateway's status, code, message and param.
"""

from server.client.client import LoraplexClient, Progress
from server.client.errors import LoraplexError
from server.client.models import (
    TERMINAL_STATUSES,
    AdapterInfo,
    AliasInfo,
    Checkpoint,
    EvalScore,
    FineTuningJob,
    GateRule,
    JobEvent,
    TrainingFile,
    UsageReport,
    VersionEvals,
    VersionInfo,
)

__all__ = [
    "TERMINAL_STATUSES",
    "AdapterInfo",
    "AliasInfo",
    "Checkpoint",
    "EvalScore",
    "FineTuningJob",
    "GateRule",
    "JobEvent",
    "LoraplexClient",
    "LoraplexError",
    "Progress",
    "TrainingFile",
    "UsageReport",
    "VersionEvals",
    "VersionInfo",
]
