"""What an engine started by a manifest must share with one `loraplex serve` starts itself.

Derived from server/gateway/engines.py, so a flag or variable added there shows up as a
failing deploy test until the manifests carry it too.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from unittest import mock

from server.config import Settings, env_name
from server.engine_plugin import resolver as plugin
from server.gateway.engines import engine_command, engine_environment, resolver_environment

# Logging defaults the image already gets right.
_OPTIONAL_ENV = frozenset({"PYTHONUNBUFFERED", "VLLM_LOGGING_LEVEL"})


def flags(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def supervisor_flags() -> set[str]:
    """The vLLM flags `loraplex serve` passes to the engines it starts, on the GPU build the
    manifests run (on the CPU build it adds a fixed ``--kv-cache-memory-bytes``)."""
    with mock.patch("server.config.vllm_cpu_build", return_value=False):
        return flags(engine_command(Settings(), 8000))


def missing_flags(script: str) -> set[str]:
    """Supervisor flags absent from an engine's shell script."""
    argv = shlex.split(script)
    assert "vllm.entrypoints.openai.api_server" in argv, "the script does not start vLLM"
    return supervisor_flags() - flags(argv)


def required_engine_env() -> set[str]:
    """Variables the engine process needs: the resolver's and runtime LoRA updating."""
    settings = Settings()
    needed = set(resolver_environment(settings, "0" * 64, Path("cache")))
    needed |= set(engine_environment(settings, {})) - set(os.environ)
    return needed - _OPTIONAL_ENV


def known_variables() -> set[str]:
    """Every LORAPLEX_* variable loraplex reads: settings and the resolver plugin's."""
    settings = {env_name(f.name) for f in dataclasses.fields(Settings)}
    resolver = {
        value
        for name, value in vars(plugin).items()
        if name.endswith("_ENV") and isinstance(value, str)
    }
    return settings | resolver
