"""Which names may name a new adapter.

Two rules. The name must have the form a request's ``model`` string can
address: the router parses requests with the same grammar, but the registry
imports nothing of the router, so tests/registry/test_adapter_names.py checks
that the two agree on every name. And it must lie outside the LoRA namespace,
where the gateway answers every name like an unknown model.
"""

from __future__ import annotations

import re

from registry import lora_names
from registry.errors import InvalidRequest

MAX_LENGTH = 64
"""Characters in an adapter name at most."""

# Explicit ASCII classes: ``\w`` would accept Unicode letters, and look-alikes with them.
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LENGTH - 1}}}")


def check_adapter_name(name: str) -> None:
    """Raise ``InvalidRequest`` unless ``name`` may name a new adapter."""
    if lora_names.in_namespace(name):
        raise InvalidRequest(
            f"adapter name {name!r} is in the {lora_names.PREFIX!r} namespace (in any case), "
            "reserved for the names engines load versions under; pick a name that does not "
            f"start with {lora_names.PREFIX!r}"
        )
    if _NAME.fullmatch(name) is None:
        raise InvalidRequest(
            f"adapter name {name!r} is not valid: use 1-{MAX_LENGTH} ASCII letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
