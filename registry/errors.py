"""Registry errors: each message says what went wrong and what to do next."""

from __future__ import annotations

from sqlalchemy import exc as _sql

DATABASE_DOWN = (_sql.OperationalError, _sql.InterfaceError, _sql.TimeoutError)
"""What the database driver raises while the registry database is down, restarting or
out of connections: retryable conditions, not bugs, for every process that uses it."""


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class NotFound(RegistryError):
    """The named tenant, key, base, adapter or version does not exist (or is not yours)."""


class Conflict(RegistryError):
    """The operation clashes with the current state (a duplicate name, an alias in use...)."""


class InvalidLimits(RegistryError):
    """Tenant limits or upload limits that cannot be right (negative, zero...)."""


class InvalidRequest(RegistryError):
    """An argument is out of range (a canary weight above 1, an unknown scope...)."""


class AdapterRejected(RegistryError):
    """An upload was refused; ``problems`` lists every reason, and nothing was stored."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"adapter rejected ({len(self.problems)} problem(s)); fix these and upload again:\n"
            f"{lines}"
        )


class GateFailed(RegistryError):
    """A promote was refused by promotion gates; ``failures`` lists every failed gate."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(
            "promotion refused by gates; add passing eval results for this version, "
            f"or ask an admin to promote with override:\n{lines}"
        )


class CorruptBlob(RegistryError):
    """A stored blob does not match its recorded hash; it is never served."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"blob {key} is corrupt: expected sha256 {expected}, got {actual}; "
            "it was not served. Re-upload the adapter version or restore the blob from backup."
        )


class PermissionDenied(RegistryError):
    """The actor may not do this (a non-admin asking for a gate override...)."""
