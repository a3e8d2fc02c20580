"""The adapter disk cache: hits and misses, LRU eviction by size, holds, restarts, failures.

Narrow unit tests: the fetch is ``FakeFetch``, which writes entries the way
``Registry.fetch_version`` does (staging directory + rename). The real fetch
(registry + blob store, hash verification) is exercised in test_vllm_plugin.py.
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
from server.adapter_cache import AdapterCache, AdapterFetchFailed, InvalidEntryName

KB = 1024


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


def fill(cache: AdapterCache, fetch: FakeFetch, *entries: str) -> None:
    """Get and release each entry in turn, so their recency follows the argument order."""
    for name in entries:
        cache.get(name, fetch)
        cache.release(name)
        time.sleep(0.01)  # distinct mtimes even on coarse filesystems


def test_miss_then_hit_returns_the_fetched_directory(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path / "c", 100 * KB), FakeFetch()
    hits = sample("loraplex_adapter_cache_hits_total")
    misses = sample("loraplex_adapter_cache_misses_total")
    fetches = sample("loraplex_adapter_fetch_seconds_count")

    first = cache.get("lx-a", fetch)
    second = cache.get("lx-a", fetch)

    assert first == second == tmp_path / "c" / "lx-a"
    assert (first / WEIGHTS_FILE).stat().st_size == 10 * KB - 2
    assert fetch.calls == ["lx-a"]
    assert sample("loraplex_adapter_cache_hits_total") == hits + 1
    assert sample("loraplex_adapter_cache_misses_total") == misses + 1
    assert sample("loraplex_adapter_fetch_seconds_count") == fetches + 1
    assert sample("loraplex_adapter_cache_bytes") == cache.total_bytes() == 10 * KB


def test_least_recently_used_entries_go_first_when_over_the_bound(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 30 * KB), FakeFetch()
    fill(cache, fetch, "lx-a", "lx-b", "lx-c")
    fill(cache, fetch, "lx-a")  # a is now the most recent

    fill(cache, fetch, "lx-d")

    assert names(cache) == ["lx-c", "lx-a", "lx-d"]
    assert not (tmp_path / "lx-b").exists()
    assert cache.total_bytes() == 30 * KB


def test_held_entries_are_never_evicted(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 20 * KB), FakeFetch()
    cache.get("lx-a", fetch)  # held: an engine reads it for as long as it runs
    fill(cache, fetch, "lx-b", "lx-c")

    assert names(cache) == ["lx-a", "lx-c"]
    cache.release("lx-a")
    fill(cache, fetch, "lx-d")
    assert names(cache) == ["lx-c", "lx-d"]


def test_the_entry_being_returned_stays_even_when_alone_over_the_bound(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 5 * KB)
    fill(cache, FakeFetch(), "lx-small-a", "lx-small-b")

    path = cache.get("lx-big", FakeFetch(size=50 * KB))

    assert (path / WEIGHTS_FILE).is_file()
    assert names(cache) == ["lx-big"]


def test_a_new_cache_on_the_same_root_reuses_entries_and_their_recency(tmp_path: Path) -> None:
    first, fetch = AdapterCache(tmp_path, 30 * KB), FakeFetch()
    fill(first, fetch, "lx-a", "lx-b", "lx-c")
    fill(first, fetch, "lx-a")

    restarted = AdapterCache(tmp_path, 30 * KB)
    assert names(restarted) == ["lx-b", "lx-c", "lx-a"]
    restarted.get("lx-c", fetch)
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
        cache.get("lx-b", FailingFetchFake())

    assert not (tmp_path / "lx-b").exists()
    assert names(cache) == ["lx-a"]
    assert names(AdapterCache(tmp_path, 100 * KB)) == ["lx-a"]  # the temp file went too
    assert (cache.get("lx-b", FakeFetch()) / WEIGHTS_FILE).is_file()


def test_a_failed_fetch_does_not_hold_its_name(tmp_path: Path) -> None:
    cache = AdapterCache(tmp_path, 20 * KB)
    with pytest.raises(AdapterFetchFailed):
        cache.get("lx-a", FailingFetchFake())
    fill(cache, FakeFetch(), "lx-a", "lx-b", "lx-c")
    assert names(cache) == ["lx-b", "lx-c"]


def test_concurrent_gets_of_one_name_fetch_once(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 100 * KB), FakeFetch(delay=0.2)
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: cache.get("lx-a", fetch), range(8)))
    assert fetch.calls == ["lx-a"]
    assert set(paths) == {tmp_path / "lx-a"}


def test_different_names_fetch_in_parallel(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 100 * KB), FakeFetch(delay=0.3)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: cache.get(f"lx-{n}", fetch), range(4)))
    assert time.monotonic() - started < 4 * 0.3
    assert sorted(fetch.calls) == ["lx-0", "lx-1", "lx-2", "lx-3"]


def test_an_entry_damaged_on_disk_is_fetched_again(tmp_path: Path) -> None:
    cache, fetch = AdapterCache(tmp_path, 100 * KB), FakeFetch()
    path = cache.get("lx-a", fetch)
    (path / WEIGHTS_FILE).unlink()

    assert (cache.get("lx-a", fetch) / WEIGHTS_FILE).is_file()
    assert fetch.calls == ["lx-a", "lx-a"]


@pytest.mark.parametrize("name", ["", ".lx-a", "../lx-a", "a/b", "a\\b"])
def test_names_that_could_escape_the_root_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidEntryName):
        AdapterCache(tmp_path, KB).get(name, FakeFetch())


def test_a_bound_below_one_byte_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        AdapterCache(tmp_path, 0)
