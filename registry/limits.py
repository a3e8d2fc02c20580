"""Upload limits: what an adapter upload may hold."""

from __future__ import annotations

from dataclasses import dataclass

from registry.errors import InvalidLimits


@dataclass(frozen=True)
class UploadLimits:
    """Bounds checked before any upload byte is stored."""

    max_members: int = 16
    """Most files (or archive members, directories included) one upload may hold."""

    max_member_bytes: int = 512 << 20
    """Largest single file in an upload, in bytes."""

    max_total_bytes: int = 512 << 20
    """Largest total of all files in an upload, uncompressed, in bytes."""

    max_rank: int = 64
    """Highest LoRA rank accepted (``r`` and every ``rank_pattern`` value)."""

    def __post_init__(self) -> None:
        bad = [name for name, value in vars(self).items() if value < 1]
        if bad:
            raise InvalidLimits(f"upload limits {', '.join(bad)} must be at least 1")
