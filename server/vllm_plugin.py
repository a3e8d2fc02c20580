"""vLLM general plugin: the loraplex LoRA resolver (entry point ``vllm.general_plugins``).

vLLM loads this in every engine process where loraplex is installed. It does
nothing unless ``LORAPLEX_RESOLVER_DATABASE_URL`` is set, so installing
loraplex never changes a plain vLLM deployment.
"""

from __future__ import annotations

import os


def register() -> None:
    if not os.environ.get("LORAPLEX_RESOLVER_DATABASE_URL"):
        return
    raise NotImplementedError("the registry-backed resolver arrives with issue 4")
