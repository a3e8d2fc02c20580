"""The adapter disk cache: hits and misses, LRU eviction by size, room for fetches, holds,
restarts, failures.

Narrow unit tests: the fetch is ``FakeFetch``, which writes entries the way
``Registry.fetch_version`` does (staging directory + rename). The real fetch
(registry + blob store, hash verification) is exercised in test_resolver.py.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from registry.archive import CONFIG_FILE, WEIGHTS_FILE
from server.engine_plugin.adapter_cache import (
    AdapterCache,
    AdapterFetchFailed,
    AdapterTooLarge,
    CacheFull,
    InvalidEntryName,
)

KB = 1024
ROOM_FOR_3 = 40 * KB
"""A bound that holds three 10 KB entries, since a fetch needs room for twice its blob."""


class FakeFetch:
    """Writes ``dest/name`` holding a config and ``size`` bytes of weights; counts calls."""

    def __init__(self, size: int = 10 * KB, delay: float = 0.0) -> None:
        self.size = size
        self.delay = delay
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, dest_dir: Path) -> Path:
        with self._lock:
            self.calls.append(name)
        time.sleep(self.delay)
        staging = Path(tempfile.mkdtemp(dir=dest_dir, prefix=f".{name}."))
        (staging / CONFIG_FILE).write_text("{}")
        (staging / WEIGHTS_FILE).write_bytes(b"w" * (self.size - 2))
        os.replace(staging, dest_dir / name)
        return dest_dir / name


class FailingFetchFake:
    """Leaves a half-written entry and a temp file behind, then fails like a full disk."""

    def __call__(self, name: str, dest_dir: Path) -> Path:
        (dest_dir / f".{name}.x1.tar").write_bytes(b"partial")
        (dest_dir / name).mkdir()
        (dest_dir / name / CONFIG_FILE).write_text("{}")
        raise OSError(28, "No space left on device")


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def names(cache: AdapterCache) -> list[str]:
    return [entry.name for entry in cache.entries()]


def get(cache: AdapterCache, name: str, fetch: FakeFetch) -> Path:
    """``cache.get`` with the fake's size as the blob's (a real blob is a little larger)."""
    return cache.get(name, fetch, fetch.size)


def fill(cache: AdapterCache, fetch: FakeFetch, *entries: str) -> None:
    """Get and release each entry in turn, so their recency follows the argument order."""
    for name in entries:
        get(cache, name, fetch)
        cache.release(name)
        time.sleep(0.01)  # distinct mtimes even on coarse filesystems


def test_miss_then_hit_returns_the_fetched_directory(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path / "c", 100 * KB), FakeFetch()
    hits = sample("loraplex_adapter_cache_hits_total")
    misses = sample("loraplex_adapter_cache_misses_total")
    fetches = sample("loraplex_adapter_fetch_seconds_count")

    first = get(cache, "lx-a", fetch)
    second = get(cache, "lx-a", fetch)

    assert first == second == tmp_path / "c" / "lx-a"
    assert (first / WEIGHTS_FILE).stat().st_size == 10 * KB - 2
    assert fetch.calls == ["lx-a"]
    assert sample("loraplex_adapter_cache_hits_total") == hits + 1
    assert sample("loraplex_adapter_cache_misses_total") == misses + 1
    assert sample("loraplex_adapter_fetch_seconds_count") == fetches + 1
    assert sample("loraplex_adapter_cache_bytes") == cache.total_bytes() == 10 * KB


def test_least_recently_used_entries_go_first_to_make_room(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, ROOM_FOR_3), FakeFetch()
    evictions = sample("loraplex_adapter_cache_evictions_total")
    fill(cache, fetch, "lx-a", "lx-b", "lx-c")
    fill(cache, fetch, "lx-a")  # a is now the most recent

    fill(cache, fetch, "lx-d")  # needs 20 KB while it is fetched: b goes

    assert names(cache) == ["lx-c", "lx-a", "lx-d"]
    assert not (tmp_path / "lx-b").exists()
    assert cache.total_bytes() == 30 * KB
    assert sample("loraplex_adapter_cache_evictions_total") == evictions + 1


def test_a_touch_counts_as_a_use(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, ROOM_FOR_3), FakeFetch()
    fill(cache, fetch, "lx-a", "lx-b", "lx-c")
    cache.touch("lx-a")  # a request looked it up; nothing was resolved
    cache.touch("lx-unknown")  # not an entry: ignored

    fill(cache, fetch, "lx-d")

    assert names(cache) == ["lx-c", "lx-a", "lx-d"]


def test_held_entries_are_never_evicted_by_the_cache(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, ROOM_FOR_3), FakeFetch()
    get(cache, "lx-a", fetch)  # held: the engine may read it again at any time
    fill(cache, fetch, "lx-b", "lx-c", "lx-d")

    assert names(cache) == ["lx-a", "lx-c", "lx-d"]
    assert [e.name for e in cache.held()] == ["lx-a"]
    cache.release("lx-a")
    fill(cache, fetch, "lx-e")
    assert names(cache) == ["lx-c", "lx-d", "lx-e"]


def test_when_held_entries_take_the_room_nothing_is_fetched(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, ROOM_FOR_3), FakeFetch()
    for name in ("lx-a", "lx-b", "lx-c"):
        get(cache, name, fetch)

    with pytest.raises(CacheFull, match=r"lx-d.*10240 bytes short") as raised:
        get(cache, "lx-d", fetch)

    assert raised.value.short == 10 * KB
    assert fetch.calls == ["lx-a", "lx-b", "lx-c"]
    assert "lx-d" not in {e.name for e in cache.held()}
    assert cache.evict("lx-a") == 10 * KB  # what the resolver does once the engine let go
    assert (get(cache, "lx-d", fetch) / WEIGHTS_FILE).is_file()
    assert names(cache) == ["lx-b", "lx-c", "lx-d"]


class HeldFetchFake(FakeFetch):
    """A ``FakeFetch`` that, once called, waits for ``go`` (set ``started`` tells it was called)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Semaphore(0)
        self.go = threading.Event()

    def __call__(self, name: str, dest_dir: Path) -> Path:
        self.started.release()
        assert self.go.wait(30)
        return super().__call__(name, dest_dir)


def test_fetches_in_progress_count_against_the_bound(tmp_path: Path) -> None:
    cache, held = AdapterCache(tmp_path, ROOM_FOR_3), HeldFetchFake()
    with ThreadPoolExecutor(2) as pool:
        fetching = [pool.submit(get, cache, n, held) for n in ("lx-a", "lx-b")]
        for _ in fetching:  # both reserved their 20 KB: a fetch starts only after that
            assert held.started.acquire(timeout=30)
        with pytest.raises(CacheFull, match="20480 bytes short"):
            get(cache, "lx-c", FakeFetch())
        held.go.set()
        for done in fetching:
            done.result()
    assert sorted(names(cache)) == ["lx-a", "lx-b"]


def test_an_adapter_whose_fetch_cannot_fit_is_refused(tmp_path: Path) -> None:
    cache, big = AdapterCache(tmp_path, 50 * KB), FakeFetch(size=30 * KB)
    fill(cache, FakeFetch(), "lx-a")

    with pytest.raises(AdapterTooLarge, match=r"61440 bytes.*51200.*ADAPTER_CACHE_BYTES"):
        get(cache, "lx-big", big)

    assert big.calls == []
    assert names(cache) == ["lx-a"]
    assert cache.held() == []


def test_evict_deletes_an_entry_at_once(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, ROOM_FOR_3), FakeFetch()
    get(cache, "lx-a", fetch)

    assert cache.evict("lx-a") == 10 * KB
    assert cache.evict("lx-a") == 0
    assert names(cache) == [] and cache.held() == []
    assert sorted(tmp_path.iterdir()) == []
    assert sample("loraplex_adapter_cache_bytes") == 0


def test_a_new_cache_on_the_same_root_reuses_entries_and_their_recency(tmp_path: Path) -> None:
    first, fetch = AdapterCache(tmp_path, ROOM_FOR_3), FakeFetch()
    fill(first, fetch, "lx-a", "lx-b", "lx-c")
    fill(first, fetch, "lx-a")

    restarted = AdapterCache(tmp_path, ROOM_FOR_3)
    assert names(restarted) == ["lx-b", "lx-c", "lx-a"]
    get(restarted, "lx-c", fetch)
    fill(restarted, fetch, "lx-d")

    assert fetch.calls == ["lx-a", "lx-b", "lx-c", "lx-d"]
    assert names(restarted) == ["lx-a", "lx-c", "lx-d"]


def test_leftovers_of_interrupted_fetches_and_evictions_are_removed_on_start(
    tmp_path: Path,
) -> None:
    fill(AdapterCache(tmp_path, 100 * KB), FakeFetch(), "lx-a")
    (tmp_path / ".lx-b.abc123.tar").write_bytes(b"half a download")
    (tmp_path / ".lx-b.def456").mkdir()
    (tmp_path / ".lx-c.evicted").mkdir()  # an eviction cut short
    (tmp_path / "operator-notes.txt").write_text("not ours: left alone")

    assert names(AdapterCache(tmp_path, 100 * KB)) == ["lx-a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lx-a", "operator-notes.txt"]


def test_a_failed_fetch_leaves_no_entry_and_can_be_retried(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 100 * KB)
    fill(cache, FakeFetch(), "lx-a")

    with pytest.raises(AdapterFetchFailed, match=r"lx-b.*No space left on device.*free disk"):
        cache.get("lx-b", FailingFetchFake(), KB)

    assert not (tmp_path / "lx-b").exists()
    assert names(cache) == ["lx-a"]
    assert names(AdapterCache(tmp_path, 100 * KB)) == ["lx-a"]  # the temp file went too
    assert (get(cache, "lx-b", FakeFetch()) / WEIGHTS_FILE).is_file()


def test_a_failed_fetch_does_not_hold_its_name_or_its_room(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, ROOM_FOR_3)
    with pytest.raises(AdapterFetchFailed):
        cache.get("lx-a", FailingFetchFake(), 10 * KB)
    fill(cache, FakeFetch(), "lx-a", "lx-b", "lx-c", "lx-d")
    assert names(cache) == ["lx-b", "lx-c", "lx-d"]


def test_concurrent_gets_of_one_name_fetch_once(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 100 * KB), FakeFetch(delay=0.2)
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: get(cache, "lx-a", fetch), range(8)))
    assert fetch.calls == ["lx-a"]
    assert set(paths) == {tmp_path / "lx-a"}


def test_different_names_fetch_in_parallel(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 100 * KB), FakeFetch(delay=0.3)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: get(cache, f"lx-{n}", fetch), range(4)))
    assert time.monotonic() - started < 4 * 0.3
    assert sorted(fetch.calls) == ["lx-0", "lx-1", "lx-2", "lx-3"]


def test_an_entry_damaged_on_disk_is_fetched_again(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 100 * KB), FakeFetch()
    path = get(cache, "lx-a", fetch)
    (path / WEIGHTS_FILE).unlink()

    assert (get(cache, "lx-a", fetch) / WEIGHTS_FILE).is_file()
    assert fetch.calls == ["lx-a", "lx-a"]


@pytest.mark.parametrize("name", ["", ".lx-a", "../lx-a", "a/b", "a\\b"])
def test_names_that_could_escape_the_root_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidEntryName):
        get(AdapterCache(tmp_path, KB), name, FakeFetch())


def test_a_bound_below_one_byte_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        AdapterCache(tmp_path, 0)
