"""LoRA names: the names engines load adapter versions under, defined once.

A version's LoRA name is ``lx-`` and the first 16 hex digits of its content
fingerprint. Clients never see one: the gateway answers a request for a name
in the ``lx-`` namespace (any case, any suffix) exactly like an unknown
model, the registry refuses adapter names there, and every engine answer is
passed through ``hide`` before it reaches a client. The engine-side resolver
accepts only names of the exact form.

Standard library only: the registry mints these names, the gateway and the
engine plugin read them.
"""

from __future__ import annotations

import json
import re

PREFIX = "lx-"
"""Every LoRA name starts with this; adapter names may not (in any case)."""
HEX_DIGITS = 16
"""Fingerprint digits in a LoRA name: 64 bits, no collision among any realistic fleet."""

_EXACT = re.compile(rf"{re.escape(PREFIX)}[0-9a-f]{{{HEX_DIGITS}}}")


def lora_name(fingerprint: str) -> str:
    """The LoRA name of the version whose content fingerprint is ``fingerprint``."""
    return PREFIX + fingerprint[:HEX_DIGITS]


def is_lora_name(name: str) -> bool:
    """Whether ``name`` has exactly the form ``lora_name`` produces."""
    return _EXACT.fullmatch(name) is not None


def in_namespace(name: str) -> bool:
    """Whether ``name`` falls in the LoRA namespace (``lx-``, any case): never a client's name."""
    return name[: len(PREFIX)].lower() == PREFIX


def hide(data: bytes, lora: str, shown: str) -> bytes:
    """``data`` (engine JSON or SSE events) with every occurrence of ``lora`` replaced by ``shown``.

    A LoRA name holds no character JSON escapes, so it appears as the same bytes
    wherever it is: a ``"model"`` value with or without spaces around the colon,
    inside an error message, in any field. ``shown`` is written JSON-escaped, as
    it must be inside a JSON string.
    """
    if lora == shown:
        return data
    return data.replace(lora.encode(), json.dumps(shown)[1:-1].encode())
