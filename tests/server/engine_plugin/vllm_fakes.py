"""Running vLLM's own LoRA-table code (``OpenAIServingModels``, ``BaseServing``) without an engine.

``EngineClientFake`` is the narrow fake: it stands for vLLM's engine client
and records the adapter ids it is told to add and remove. A "request" is a
task that runs vLLM's model check and adapter lookup the way a chat or
completion handler does.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.serving import BaseServing
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolverRegistry


class EngineClientFake:
    """What ``OpenAIServingModels`` and an unload use of vLLM's engine client."""

    def __init__(self, model: str = "/models/base") -> None:
        self.model_config = SimpleNamespace(model=model)
        self.renderer = None
        self.input_processor = None
        self.added: list[int] = []
        self.removed: list[int] = []
        self.remove_fails = False

    async def add_lora(self, request: LoRARequest) -> bool:
        self.added.append(request.lora_int_id)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        if self.remove_fails:
            raise RuntimeError("engine core unreachable")
        self.removed.append(lora_id)
        return True


def serving_models(
    monkeypatch: pytest.MonkeyPatch, engine: EngineClientFake, resolver: object
) -> OpenAIServingModels:
    """vLLM's table of LoRAs, with ``resolver`` as its only resolver, as an engine builds it."""
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {"under-test": resolver})
    base = BaseModelPath("base", engine.model_config.model)
    return OpenAIServingModels(engine, [base])  # type: ignore[arg-type]


async def check_model(models: OpenAIServingModels, name: str) -> None:
    """vLLM's model check, which resolves an unknown name (and raises what the resolver raises)."""
    serving = BaseServing(models, models.model_config)
    assert await serving._check_model(SimpleNamespace(model=name)) is None  # type: ignore[arg-type]


def adapter_of(models: OpenAIServingModels, name: str) -> LoRARequest:
    """vLLM's adapter lookup, whose answer goes with the request to the engine."""
    serving = BaseServing(models, models.model_config)
    found = serving._maybe_get_adapters(SimpleNamespace(model=name))  # type: ignore[arg-type]
    assert found is not None
    return found


async def request(models: OpenAIServingModels, name: str) -> LoRARequest:
    """A whole request's lookups, in its own task as a handler runs; the adapter it got."""

    async def handler() -> LoRARequest:
        await check_model(models, name)
        return adapter_of(models, name)

    found = await asyncio.create_task(handler())
    await asyncio.sleep(0)  # the loop lets go of the finished task, and the result it holds
    return found


def entry(models: OpenAIServingModels, name: str) -> LoRARequest | None:
    """The table's entry for ``name``, read without counting as a request's lookup."""
    return dict.get(models.lora_requests, name)
