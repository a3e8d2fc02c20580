"""The adapter disk budget holds while the real vLLM engine serves many adapters.

One ``loraplex serve`` of its own, whose engine's cache may hold three
adapters' bytes, serves 20 adapters requested in turn and then in another
order. A thread samples the cache directory (every file under it, fetches in
progress included) the whole time. Then one adapter streams a long answer
while others are fetched: it must stay on disk until its stream ends.

Every answer must be 200 and equal PEFT's greedy output for that adapter.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import LocalBlobStore, Registry
from tests.e2e.conftest import ENGINE_ARGS, OPERATOR, TenantKeys, make_tenant
from tests.e2e.serving import ServeProcess, free_port, metric_samples
from tests.e2e.test_tenancy import MAX_TOKENS, PROMPT, peft_greedy
from tests.registry.registry_testdata import build_adapter

ADAPTERS = 20
BUDGET_IN_ADAPTERS = 3
STREAM_TOKENS = 600  # long enough that other adapters are fetched while it streams
ENGINE_DONE_MARGIN = 200
"""Chunks before the end of the stream at which the engine may already be done with it."""


@dataclass
class DiskSampler:
    """Samples the bytes of every file under ``root`` in a thread, as fast as it can walk."""

    root: Path
    watched: str = ""
    """A cache entry that must stay while ``watching`` is set."""
    max_bytes: int = 0
    samples: int = 0
    watched_missing: int = 0
    entries_gone_while_watching: set[str] = field(default_factory=set)
    watching: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> DiskSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def _run(self) -> None:
        seen: set[str] = set()
        while not self._stop.is_set():
            names, size = _walk(self.root)
            self.samples += 1
            self.max_bytes = max(self.max_bytes, size)
            if self.watching.is_set():
                self.watched_missing += self.watched not in names
                self.entries_gone_while_watching |= seen - names
                seen = names
            self._stop.wait(0.002)


def _walk(root: Path) -> tuple[set[str], int]:
    """(entry names, bytes of every file) under ``root``; what vanishes mid-walk counts 0."""
    names: set[str] = set()
    size = 0
    try:
        top = list(os.scandir(root))
    except FileNotFoundError:
        return names, 0
    for item in top:
        try:
            if item.is_dir(follow_symlinks=False):
                names.add(item.name)
                size += sum(f.stat().st_size for f in os.scandir(item.path) if f.is_file())
            else:
                size += item.stat().st_size
        except FileNotFoundError:
            continue
    return names, size


@dataclass
class Budgeted:
    serve: ServeProcess
    engine_url: str
    cache: Path
    budget: int
    tenant: TenantKeys
    lora_names: dict[str, str]
    """Adapter name -> the engine-side name (its cache entry)."""
    references: dict[str, str]
    """Adapter name -> PEFT's greedy completion of PROMPT."""

    def complete(self, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        return httpx.post(
            self.serve.url + "/v1/completions",
            json={**body, **extra},
            headers={"authorization": f"Bearer {self.tenant.key}"},
            timeout=120,
        )

    def engine_counter(self, name: str) -> float:
        return sum(value for _, value in metric_samples(self.engine_url, name))


def bundle_size(demo_base: Path, adapter: Path, scratch: Path) -> int:
    """The blob size the registry records for ``adapter`` (what a fetch downloads)."""
    registry = Registry(f"sqlite:///{scratch / 'scratch.db'}", LocalBlobStore(scratch / "blobs"))
    try:
        registry.register_base(demo_base, demo_base.name, "main", OPERATOR)
        tenant = make_tenant(registry, "scratch")
        version = registry.push_adapter(tenant.tenant_id, "a", adapter, demo_base.name, OPERATOR)
        return version.size_bytes
    finally:
        registry.close()


@pytest.fixture(scope="module")
def budgeted(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Budgeted]:
    root = tmp_path_factory.mktemp("disk-budget")
    paths = {
        f"bot-{i:02d}": build_adapter(demo_base, root / f"bot-{i:02d}", seed=100 + i)
        for i in range(ADAPTERS)
    }
    budget = BUDGET_IN_ADAPTERS * bundle_size(demo_base, paths["bot-00"], root)
    home, engine_port = root / "serve", free_port()
    serve = ServeProcess(
        home,
        args=[
            "--base-model",
            str(demo_base),
            "--engine-port",
            str(engine_port),
            "--adapter-cache-bytes",
            str(budget),
            *ENGINE_ARGS,
        ],
    ).start()
    registry: Registry | None = None
    try:
        # PEFT's answers while the engine starts.
        references = {
            name: peft_greedy(demo_base, p, PROMPT, MAX_TOKENS) for name, p in paths.items()
        }
        serve.wait_ready()
        registry = Registry(f"sqlite:///{home / 'registry.db'}", LocalBlobStore(home / "blobs"))
        tenant = make_tenant(registry, "budget")
        lora_names = {}
        for name, path in paths.items():
            version = registry.push_adapter(tenant.tenant_id, name, path, demo_base.name, OPERATOR)
            assert BUDGET_IN_ADAPTERS * version.size_bytes == budget
            registry.promote(tenant.tenant_id, name, version.number, OPERATOR)
            lora_names[name] = version.lora_name
        yield Budgeted(
            serve,
            f"http://127.0.0.1:{engine_port}",
            home / "adapter-cache" / "engine-0",  # where serve puts engine 0's cache
            budget,
            tenant,
            lora_names,
            references,
        )
    finally:
        assert serve.stop(), serve.log_tail()
        if registry is not None:
            registry.close()


def test_the_cache_stays_within_its_budget_and_every_answer_is_the_adapters_own(
    budgeted: Budgeted,
) -> None:
    names = sorted(budgeted.lora_names)
    again = names[:]
    random.Random(16).shuffle(again)
    assert again != names
    evictions = budgeted.engine_counter("loraplex_adapter_cache_evictions_total")
    misses = budgeted.engine_counter("loraplex_adapter_cache_misses_total")
    statuses: list[int] = []
    wrong: list[str] = []

    with DiskSampler(budgeted.cache) as disk:
        for name in names + again:
            response = budgeted.complete(name)
            statuses.append(response.status_code)
            if response.status_code != 200:
                wrong.append(f"{name}: {response.status_code} {response.text[:300]}")
                continue
            text = response.json()["choices"][0]["text"]
            if text != budgeted.references[name]:
                wrong.append(f"{name}: {text!r} != PEFT {budgeted.references[name]!r}")

    evicted = budgeted.engine_counter("loraplex_adapter_cache_evictions_total") - evictions
    fetched = budgeted.engine_counter("loraplex_adapter_cache_misses_total") - misses
    print(
        f"\n{len(statuses)} requests ({statuses.count(200)} ok) over {ADAPTERS} adapters; "
        f"cache at most {disk.max_bytes} of {budgeted.budget} bytes in {disk.samples} samples; "
        f"{fetched:.0f} fetches, {evicted:.0f} evictions; "
        f"{len(set(budgeted.references.values()))} distinct reference answers"
    )
    assert wrong == []
    assert disk.max_bytes <= budgeted.budget
    assert disk.samples > len(statuses)
    # The second round found at most the last two of the first still cached.
    assert fetched >= 2 * ADAPTERS - 2 and evicted >= fetched - 2


def test_an_adapter_streaming_an_answer_stays_on_disk_until_it_ends(budgeted: Budgeted) -> None:
    streamed, others = "bot-00", [f"bot-{i:02d}" for i in range(1, 11)]
    chunks: list[dict[str, Any]] = []
    opened, statuses = threading.Event(), []

    def stream() -> None:
        body = {
            "model": streamed,
            "prompt": PROMPT,
            "max_tokens": STREAM_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"authorization": f"Bearer {budgeted.tenant.key}"}
        url = budgeted.serve.url + "/v1/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as response:
            statuses.append(response.status_code)
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line.removeprefix("data: ")))
                    opened.set()
                    if len(chunks) == STREAM_TOKENS - ENGINE_DONE_MARGIN:
                        # The engine may have finished (the rest is buffered on the way):
                        # from here the adapter is no longer in use, and may go.
                        disk.watching.clear()
        opened.set()

    disk = DiskSampler(budgeted.cache, watched=budgeted.lora_names[streamed])
    with disk:
        reader = threading.Thread(target=stream)
        reader.start()
        assert opened.wait(120)
        disk.watching.set()
        other_statuses = [budgeted.complete(name).status_code for name in others]
        reader.join()
        disk.watching.clear()

    errors = [c for c in chunks if "choices" not in c]
    assert errors == []  # an engine that read a deleted adapter fails the stream here
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    usage = [c["usage"] for c in chunks if c.get("usage")]
    overlapped = disk.entries_gone_while_watching - {budgeted.lora_names[streamed]}
    print(
        f"\nstream of {usage[-1]['completion_tokens'] if usage else '?'} tokens; "
        f"{len(overlapped)} other adapters evicted while it streamed; "
        f"its entry missing in {disk.watched_missing} of {disk.samples} samples; "
        f"cache at most {disk.max_bytes} of {budgeted.budget} bytes"
    )
    assert statuses == [200] and other_statuses == [200] * len(others)
    assert usage and usage[-1]["completion_tokens"] == STREAM_TOKENS
    assert text.startswith(budgeted.references[streamed])
    assert overlapped, "no adapter was evicted while the stream ran: raise STREAM_TOKENS"
    assert disk.watched_missing == 0
    assert disk.max_bytes <= budgeted.budget
