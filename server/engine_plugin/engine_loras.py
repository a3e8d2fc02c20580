"""Unloading adapters from the running vLLM engine, never while a request uses them.

vLLM (0.32) keeps every LoRA it resolved in ``OpenAIServingModels.lora_requests``
(LoRA name -> ``LoRARequest``, whose ``lora_path`` is the disk cache entry). Its
engine core keeps loaded adapters in a memory LRU by ``lora_int_id`` and re-reads
``lora_path`` whenever a request needs one that LRU dropped. A cache entry may
therefore be deleted only once (1) its name is out of that table, so the next
request for it resolves it again through the resolver, (2) no request that took
its ``LoRARequest`` is still in flight, and (3) the engine core was told to
forget that id.

How each stage of a request's use is known, all inside the API server process:

- From vLLM's model check (``_check_model``) to its adapter lookup
  (``_maybe_get_adapters``) a request knows only the name. The table is
  replaced by a ``LoraTable``, which notes the asyncio task behind every lookup
  of a name; a name a live task looked up is not unloaded.
- From the adapter lookup until its answer is sent, a request holds the
  ``LoRARequest`` object itself: in the handler, the stream generators, and the
  output processor's request state (which lives until the engine core finished
  the request or was sent its abort). An unload takes the object out of the
  table and unloads it only if nothing else references it (CPython's reference
  count); otherwise it puts it back at once. No await separates the two, so no
  request ever finds the name missing.
- The engine core gets ``remove_lora`` for the id, on the same ordered input
  queue as any abort of a request that used it, before the files are deleted.

Why this, not hold counts kept by a middleware or the gateway: the reference
count sees every path through vLLM that keeps the adapter (streams whose
handler task has already returned, aborts, retries), and whatever it cannot see
(a reference cycle, a cache in vLLM) errs towards keeping an entry, never
towards deleting one in use. It all runs on the API server's event loop, under
vLLM's own per-name lock (``lora_resolver_lock``), so a request that resolves
the same name meanwhile waits until the unload is over and fetches it anew.

vLLM hands resolvers no reference to the table they fill: ``calling_serving_models``
finds it as the object whose ``resolve_lora`` is calling the resolver.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from collections.abc import Awaitable, Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)

_CALLER_FRAMES = 4
"""How far up the stack ``calling_serving_models`` looks for vLLM's ``resolve_lora``."""


def calling_serving_models() -> OpenAIServingModels | None:
    """The vLLM ``OpenAIServingModels`` whose ``resolve_lora`` is running this call, if any."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    frame: FrameType | None = sys._getframe(1)
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, OpenAIServingModels):
            return candidate
        frame = frame.f_back
    return None


class LoraTable(dict[str, "LoRARequest"]):
    """vLLM's table of resolved LoRAs, noting which request tasks looked each name up.

    vLLM reads it with ``in`` and ``[]`` on the request path (both noted) and
    deletes from it in its unload route (``/v1/unload_lora_adapter``, which the
    gateway calls for retired versions); a request deleted that way is kept
    until ``take`` finds it unused, so its files outlive every request using it.
    """

    def __init__(self, loaded: Mapping[str, LoRARequest], on_use: Callable[[str], None]) -> None:
        super().__init__(loaded)
        self._on_use = on_use
        self._users: dict[str, weakref.WeakSet[asyncio.Task[Any]]] = {}
        self._retired: dict[str, list[LoRARequest]] = {}

    def __contains__(self, name: object) -> bool:
        found = super().__contains__(name)
        if found and isinstance(name, str):
            self._used(name)
        return found

    def __getitem__(self, name: str) -> LoRARequest:
        request = super().__getitem__(name)
        self._used(name)
        return request

    def __setitem__(self, name: str, request: LoRARequest) -> None:
        super().__setitem__(name, request)
        self._used(name)

    def __delitem__(self, name: str) -> None:
        self._retired.setdefault(name, []).append(super().__getitem__(name))
        super().__delitem__(name)

    def looked_up_by_live_task(self, name: str) -> bool:
        """Whether a task that looked ``name`` up still runs (it may be about to use it)."""
        return any(not task.done() for task in self._users.get(name, ()))

    def take(self, name: str) -> list[int] | None:
        """Take ``name`` out for good: the engine ids to remove, or None (no change) if in use."""
        taken = self._retired.pop(name, [])
        current = super().__contains__(name)
        if current:
            taken.append(super().pop(name))
        # ``taken`` and getrefcount's own argument reference each; any more is a request.
        if any(sys.getrefcount(taken[i]) > 2 for i in range(len(taken))):
            if current:
                super().__setitem__(name, taken.pop())
            if taken:
                self._retired[name] = taken
            return None
        self._users.pop(name, None)
        return [request.lora_int_id for request in taken]

    def _used(self, name: str) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop in this thread: not a request
            task = None
        if task is not None:
            self._users.setdefault(name, weakref.WeakSet()).add(task)
        self._on_use(name)


class EngineLoras:
    """The API server's vLLM, seen from the resolver: its table of LoRAs and its engine core."""

    def __init__(self, models: OpenAIServingModels, on_use: Callable[[str], None]) -> None:
        self.models = models
        self.table = LoraTable(models.lora_requests, on_use)
        models.lora_requests = self.table

    async def unload(self, name: str, delete: Callable[[str], Awaitable[object]]) -> bool:
        """Unload ``name`` from vLLM, then ``delete`` it; False (nothing done) if it is in use."""
        lock = self.models.lora_resolver_lock[name]
        if lock.locked() or self.table.looked_up_by_live_task(name):
            return False
        async with lock:  # free, so taken without yielding: the checks above still hold
            ids = self.table.take(name)
            if ids is None:
                return False
            for lora_id in ids:
                await self._remove_from_engine_core(name, lora_id)
            await delete(name)
        return True

    async def _remove_from_engine_core(self, name: str, lora_id: int) -> None:
        # Failing here leaves only the engine core's copy in memory, until its own LRU
        # drops it: no request can name this id again, so nothing re-reads the files.
        # (``remove_lora`` is AsyncLLM's; vLLM's EngineClient protocol omits it.)
        remove = getattr(self.models.engine_client, "remove_lora", None)
        try:
            if remove is None:
                raise NotImplementedError(f"{type(self.models.engine_client).__name__}.remove_lora")
            await remove(lora_id)
        except Exception as exc:
            log.warning("the engine core did not remove adapter %s (id %d): %s", name, lora_id, exc)
