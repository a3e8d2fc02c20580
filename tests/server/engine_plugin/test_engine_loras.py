"""Unloading adapters from vLLM only when no request uses them (engine_plugin/engine_loras.py).

vLLM's own ``OpenAIServingModels`` (the table of LoRAs, its resolution and
unload paths) and ``BaseServing`` (the model check and adapter lookup every
request makes) run for real. The engine client is ``EngineClientFake``
(vllm_fakes.py); ``ResolverFake`` resolves any name to a fixed path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest
from vllm.lora.request import LoRARequest

from server.engine_plugin.engine_loras import EngineLoras, calling_serving_models
from tests.server.engine_plugin import vllm_fakes
from tests.server.engine_plugin.vllm_fakes import EngineClientFake, check_model

NAME = "lx-00000000000000aa"


@dataclass
class ResolverFake:
    """Resolves every name to ``/cache/<name>``; notes each call and who made it."""

    events: list[str] = field(default_factory=list)
    callers: list[object] = field(default_factory=list)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest:
        self.callers.append(calling_serving_models())
        self.events.append(f"resolve {lora_name}")
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=f"/cache/{lora_name}")


@dataclass
class Served:
    models: OpenAIServingModels
    engine: EngineClientFake
    resolver: ResolverFake
    loras: EngineLoras
    touched: list[str]
    deleted: list[str] = field(default_factory=list)

    async def delete(self, name: str) -> None:
        self.deleted.append(name)
        self.resolver.events.append(f"delete {name}")

    async def unload(self, name: str = NAME) -> bool:
        return await self.loras.unload(name, self.delete)

    def entry(self) -> LoRARequest | None:
        return vllm_fakes.entry(self.models, NAME)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    resolver, engine = ResolverFake(), EngineClientFake()
    models = vllm_fakes.serving_models(monkeypatch, engine, resolver)
    touched: list[str] = []
    yield Served(models, engine, resolver, EngineLoras(models, touched.append), touched)


async def request(served: Served) -> LoRARequest:
    return await vllm_fakes.request(served.models, NAME)


def adapter_of(served: Served) -> LoRARequest:
    return vllm_fakes.adapter_of(served.models, NAME)


async def test_the_resolver_is_told_which_vllm_table_it_fills(served: Served) -> None:
    await request(served)

    assert served.resolver.callers == [served.models]
    assert calling_serving_models() is None  # not called by vLLM


async def test_an_unused_adapter_leaves_the_table_and_the_engine_core(served: Served) -> None:
    await request(served)
    (first_id,) = served.engine.added

    assert await served.unload()

    assert served.engine.removed == [first_id]
    assert served.deleted == [NAME]
    assert served.entry() is None
    again = await request(served)  # the next request resolves it again
    assert served.resolver.events == [f"resolve {NAME}", f"delete {NAME}", f"resolve {NAME}"]
    assert again.lora_int_id == served.engine.added[-1] != first_id


async def test_lookups_count_as_uses(served: Served) -> None:
    await request(served)
    assert served.touched.count(NAME) >= 2  # the resolution, and each lookup


async def test_a_request_between_its_model_check_and_adapter_lookup_keeps_the_adapter(
    served: Served,
) -> None:
    await request(served)
    checked, rendered = asyncio.Event(), asyncio.Event()

    async def handler() -> LoRARequest:
        await check_model(served.models, NAME)
        checked.set()
        await rendered.wait()  # vLLM renders the prompt between the two
        return adapter_of(served)

    task = asyncio.create_task(handler())
    await checked.wait()

    assert not await served.unload()
    rendered.set()
    assert (await task).lora_int_id == served.engine.added[0]  # not vLLM's 404
    assert served.deleted == [] and served.engine.removed == []


async def test_a_request_holding_its_adapter_keeps_it_until_it_lets_go(served: Served) -> None:
    # A streamed answer: the handler's task has returned, its generators hold the adapter.
    stream = await request(served)

    assert not await served.unload()
    assert served.entry() is stream  # put back: later requests find it as before
    assert served.deleted == [] and served.engine.removed == []

    lora_id = stream.lora_int_id
    del stream
    assert await served.unload()
    assert served.engine.removed == [lora_id]


async def test_vllms_unload_route_keeps_the_files_until_requests_let_go(served: Served) -> None:
    stream = await request(served)
    lora_id = stream.lora_int_id

    # What the gateway does when a version is retired (a request of its own).
    unload = UnloadLoRAAdapterRequest(lora_name=NAME)
    await asyncio.create_task(served.models.unload_lora_adapter(unload))

    assert served.entry() is None
    assert not await served.unload()
    del stream
    assert await served.unload()
    assert served.engine.removed == [lora_id]
    assert served.deleted == [NAME]


async def test_an_adapter_being_resolved_is_left_alone(served: Served) -> None:
    await request(served)
    async with served.models.lora_resolver_lock[NAME]:
        assert not await served.unload()
    assert served.deleted == []


async def test_a_request_for_the_adapter_waits_until_its_unload_is_over(served: Served) -> None:
    await request(served)
    deleting, deleted = asyncio.Event(), asyncio.Event()

    async def slow_delete(name: str) -> None:
        deleting.set()
        await deleted.wait()
        await served.delete(name)

    unloading = asyncio.create_task(served.loras.unload(NAME, slow_delete))
    await deleting.wait()
    again = asyncio.create_task(request(served))
    for _ in range(20):  # every chance to resolve before the files are gone
        await asyncio.sleep(0)
    deleted.set()

    assert await unloading
    await again
    assert served.resolver.events == [f"resolve {NAME}", f"delete {NAME}", f"resolve {NAME}"]


async def test_the_files_go_even_if_the_engine_core_cannot_be_told(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    await request(served)
    served.engine.remove_fails = True

    with caplog.at_level(logging.WARNING, logger="server.engine_plugin.engine_loras"):
        assert await served.unload()

    assert served.deleted == [NAME]
    assert "did not remove adapter" in caplog.text and "unreachable" in caplog.text


async def test_a_name_vllm_never_loaded_is_just_deleted(served: Served) -> None:
    # e.g. the engine refused the adapter after it was fetched: the cache still holds it.
    assert await served.unload("lx-00000000000000bb")
    assert served.deleted == ["lx-00000000000000bb"] and served.engine.removed == []
