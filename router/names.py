"""Parse the ``model`` field of an OpenAI request into a :class:`ModelRef`.

Accepted forms: the base model's served name, ``adapter`` (alias ``production``
or the canary split), ``adapter@N`` (pinned version N >= 1) and
``adapter:alias``. The router knows nothing of the names engines load
versions under: a string in that namespace parses as any adapter form would,
and the gateway answers it exactly like an unknown name.

Matching is exact and case-sensitive over ASCII only: no Unicode normalisation,
so a look-alike (Cyrillic a U+0430, fullwidth digits, the Kelvin sign) can never
match another tenant's name.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum

MAX_MODEL_NAME_LENGTH = 128

# Explicit ASCII classes: ``\d`` and ``\w`` would accept Unicode digits/letters.
# The registry creates adapters under this same form (tests/registry/test_adapter_names.py).
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_VERSION = r"[1-9][0-9]{0,8}"  # no leading zeros, so each version has one spelling
_ADAPTER_RE = re.compile(rf"(?P<name>{_NAME})(?:@(?P<version>{_VERSION})|:(?P<alias>{_NAME}))?")
_FORBIDDEN_CHAR_RE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


class InvalidModelName(ValueError):
    """The requested model name is malformed; it can name nothing that exists."""


class RefKind(StrEnum):
    """What a request's ``model`` string names."""

    BASE = "base"
    ADAPTER = "adapter"
    PINNED = "pinned"
    ALIAS = "alias"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed ``model`` string."""

    kind: RefKind
    """Which of the accepted forms the string has."""
    name: str
    """The base's served name or the adapter name."""
    version: int | None = None
    """The pinned version number (``PINNED`` only)."""
    alias: str | None = None
    """The alias name (``ALIAS`` only)."""


def parse_model_name(model: str, base_names: Container[str]) -> ModelRef:
    """Parse ``model``; ``base_names`` holds the served names of the base models.

    Raises:
        InvalidModelName: the string cannot name a base, an adapter or a version.
    """
    check_characters(model)
    if model in base_names:
        return ModelRef(RefKind.BASE, model)
    match = _ADAPTER_RE.fullmatch(model)
    if match is None:
        raise InvalidModelName(
            f"model {model!r} is not a valid name: use the base model's name, "
            "'adapter', 'adapter@N' (N >= 1) or 'adapter:alias'"
        )
    name = match["name"]
    if match["version"] is not None:
        return ModelRef(RefKind.PINNED, name, version=int(match["version"]))
    if match["alias"] is not None:
        return ModelRef(RefKind.ALIAS, name, alias=match["alias"])
    return ModelRef(RefKind.ADAPTER, name)


def check_characters(model: str) -> None:
    """Raise ``InvalidModelName`` for an empty, overlong or control-character name."""
    if not model:
        raise InvalidModelName("model name is empty: name the base model or one of your adapters")
    if len(model) > MAX_MODEL_NAME_LENGTH:
        raise InvalidModelName(
            f"model name is {len(model)} characters long; the limit is {MAX_MODEL_NAME_LENGTH}"
        )
    if _FORBIDDEN_CHAR_RE.search(model):
        raise InvalidModelName(
            f"model name {model!r} contains whitespace or control characters; remove them"
        )
