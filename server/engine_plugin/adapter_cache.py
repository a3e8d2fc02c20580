"""The engine's adapter disk cache: size-bounded, least recently used out first.

Each entry is a directory ``<root>/<LoRA name>/`` holding a verified
adapter. The ``fetch`` callable (``Registry.fetch_version``) writes it
atomically (verified temp file, staging directory, rename), so an entry is
either complete or absent.

``max_bytes`` bounds everything under the root, fetches in progress included:
a fetch writes the version's bundle (its blob, ``size_bytes`` in the registry)
and unpacks it beside itself, so it first reserves twice the blob's size.
Room is made by deleting the least recently used entries nobody holds. An
adapter whose fetch alone needs more than ``max_bytes`` is refused
(``AdapterTooLarge``); when only held entries stand in the way, ``get`` fetches
nothing and raises ``CacheFull`` with the bytes missing.

Entries handed out are *held*: vLLM re-reads a held entry whenever its own
memory LRU dropped the adapter, so the cache never deletes one by itself. The
resolver frees room by unloading an adapter from the engine first (which
``engine_loras`` allows only when no request uses it), then calling ``evict``.

Recency is the last ``get`` or ``touch`` (the resolver touches an entry on every
request that looks the adapter up). ``get`` also sets the entry directory's
mtime, so a restarted engine finds its entries in the order it last resolved them.

One cache root belongs to one engine process: holds are not shared between
processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from registry.archive import REQUIRED_FILES
from registry.lora_names import PREFIX

log = logging.getLogger(__name__)

Fetch = Callable[[str, Path], Path]
"""Writes adapter ``name`` atomically as ``dest_dir/name`` and returns that directory."""

FETCH_ROOM_FACTOR = 2
"""Room a fetch reserves, in blob sizes: the downloaded bundle plus its unpacked files."""

# Registered once per process in the default registry, which vLLM's /metrics serves.
CACHE_HITS = Counter(
    "loraplex_adapter_cache_hits", "Adapter resolutions served from the engine's disk cache."
)
CACHE_MISSES = Counter(
    "loraplex_adapter_cache_misses", "Adapter resolutions that had to fetch from the blob store."
)
CACHE_EVICTIONS = Counter(
    "loraplex_adapter_cache_evictions",
    "Adapters deleted from the engine's disk cache to make room (unloaded from the engine first).",
)
FETCH_SECONDS = Histogram(
    "loraplex_adapter_fetch_seconds",
    "Time to fetch, verify and unpack one adapter into the disk cache.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CACHE_BYTES = Gauge(
    "loraplex_adapter_cache_bytes",
    "Bytes of adapters in the engine's disk cache.",
    multiprocess_mode="mostrecent",
)


class AdapterCacheError(Exception):
    """Base class of the cache's own errors."""


class AdapterFetchFailed(AdapterCacheError):
    """Fetching an adapter into the cache failed; the cache holds no part of it."""

    def __init__(self, name: str, root: Path, cause: BaseException) -> None:
        self.name = name
        super().__init__(
            f"could not fetch adapter {name!r} into the cache at {root}: "
            f"{type(cause).__name__}: {cause}. Nothing was cached; check the blob store "
            "and free disk space, then retry."
        )


class AdapterTooLarge(AdapterCacheError):
    """Fetching this adapter needs more room than the whole cache has: it can never be cached."""

    def __init__(self, name: str, needed: int, max_bytes: int) -> None:
        self.name = name
        self.needed = needed
        self.max_bytes = max_bytes
        super().__init__(
            f"adapter {name} needs {needed} bytes of disk while it is fetched (its bundle and "
            f"its unpacked files), more than this engine's adapter cache holds ({max_bytes} "
            "bytes); an operator must raise LORAPLEX_ADAPTER_CACHE_BYTES to serve it"
        )


class CacheFull(AdapterCacheError):
    """The room a fetch needs is taken by held entries: ``short`` bytes of them must go first."""

    def __init__(self, name: str, short: int, max_bytes: int) -> None:
        self.name = name
        self.short = short
        super().__init__(
            f"no room to fetch adapter {name}: the adapter cache ({max_bytes} bytes) is "
            f"{short} bytes short, all of it held by adapters that requests in flight use"
        )


class InvalidEntryName(AdapterCacheError, ValueError):
    """A name that cannot be a cache entry (it would escape the root or look like a temp file)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} cannot name a cache entry; use a LoRA name ({PREFIX}...)")


@dataclass(frozen=True)
class CacheEntry:
    """One adapter in the cache."""

    name: str
    """The LoRA name of the adapter version, which is also the directory name."""
    size_bytes: int
    """Bytes of the adapter's files."""
    last_used: float
    """When it was last handed out or touched (seconds since the epoch)."""


class AdapterCache:
    """A size-bounded LRU cache of adapter directories under ``root``."""

    def __init__(self, root: Path | str, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._entries: dict[str, CacheEntry] | None = None
        self._held: set[str] = set()
        self._reserved: dict[str, int] = {}
        # Written without the lock: touch runs on vLLM's event loop for every request.
        self._touched: dict[str, float] = {}

    def get(self, name: str, fetch: Fetch, size_bytes: int) -> Path:
        """The directory of adapter ``name``, fetched on a miss; held until ``release``/``evict``.

        ``size_bytes`` is the size of the version's blob (what a fetch downloads).
        Concurrent calls for one name fetch it once. Raises ``AdapterTooLarge``
        or ``CacheFull`` (nothing fetched), or ``AdapterFetchFailed`` (the cache
        is left without any part of the entry).
        """
        _check_name(name)
        with self._lock:
            # Scan (and clear leftovers) before any fetch of ours starts, so the scan
            # never mistakes a concurrent fetch's scratch files for leftovers.
            self._index()
        with self._name_lock(name):
            was_held = self._hold(name)
            try:
                path = self._ensure(name, fetch, size_bytes)
                self._use(name, path)
            except BaseException:
                with self._lock:
                    self._reserved.pop(name, None)
                if not was_held:
                    self.release(name)
                raise
        return path

    def release(self, name: str) -> None:
        """Let ``name`` be evicted again (its user no longer reads the directory)."""
        with self._lock:
            self._held.discard(name)

    def evict(self, name: str) -> int:
        """Delete ``name`` now, held or not (its holder let go of it); the bytes freed."""
        with self._name_lock(name), self._lock:
            self._held.discard(name)
            entry = self._index().get(name)
            if entry is None:
                return 0
            self._evict(entry)
            return entry.size_bytes

    def touch(self, name: str) -> None:
        """Mark ``name`` used now (cheap: no lock, no disk), if it is an entry."""
        if self._entries is not None and name in self._entries:
            self._touched[name] = time.time()

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        with self._lock:
            return self._by_recency()

    def held(self) -> list[CacheEntry]:
        """The held entries, least recently used first."""
        with self._lock:
            return [e for e in self._by_recency() if e.name in self._held]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.size_bytes for e in self._index().values())

    # -- internals ---------------------------------------------------------

    @contextlib.contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        with self._lock:
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:
            yield

    def _hold(self, name: str) -> bool:
        """Hold ``name`` (so no other thread evicts it while we use it); was it held?"""
        with self._lock:
            held = name in self._held
            self._held.add(name)
        return held

    def _ensure(self, name: str, fetch: Fetch, size_bytes: int) -> Path:
        path = self.root / name
        if self._is_cached(name, path):
            CACHE_HITS.inc()
            return path
        self._reserve(name, FETCH_ROOM_FACTOR * size_bytes)
        CACHE_MISSES.inc()
        self._fetch(name, path, fetch)
        return path  # still reserved: ``_use`` trades the reservation for the entry

    def _is_cached(self, name: str, path: Path) -> bool:
        if _complete(path):
            return True
        if path.exists():  # damaged behind our back: fetch it again
            log.warning("adapter cache entry %s is incomplete; fetching it again", path)
            self._forget(name)
        return False

    def _reserve(self, name: str, room: int) -> None:
        """Set ``room`` bytes aside for fetching ``name``, deleting unheld entries to make it."""
        if room > self.max_bytes:
            raise AdapterTooLarge(name, room, self.max_bytes)
        with self._lock:
            self._evict_unheld(room)
            short = self._used() + room - self.max_bytes
            if short > 0:
                raise CacheFull(name, short, self.max_bytes)
            self._reserved[name] = room

    def _fetch(self, name: str, path: Path, fetch: Fetch) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            fetched = fetch(name, self.root)
            if fetched != path or not _complete(path):
                raise AdapterCacheError(f"the fetch wrote {fetched}, not a complete {path}")
        except Exception as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise AdapterFetchFailed(name, self.root, exc) from exc
        FETCH_SECONDS.observe(time.monotonic() - started)

    def _use(self, name: str, path: Path) -> None:
        now = time.time()
        os.utime(path, (now, now))
        with self._lock:
            self._index()[name] = CacheEntry(name, _dir_bytes(path), now)
            self._reserved.pop(name, None)
            self._touched.pop(name, None)
            # Only if a blob was smaller than its files, which no bundle is.
            self._evict_unheld(0)
            if self._used() > self.max_bytes:
                log.warning(
                    "adapter cache holds %d bytes, over its %d-byte bound",
                    self._used(),
                    self.max_bytes,
                )
            self._publish()

    def _forget(self, name: str) -> None:
        with self._lock:
            self._delete(name)
            self._publish()

    def _evict(self, entry: CacheEntry) -> None:
        """Delete an entry to make room (lock held)."""
        self._delete(entry.name)
        self._touched.pop(entry.name, None)
        CACHE_EVICTIONS.inc()
        self._publish()
        log.info("evicted adapter %s (%d bytes) from the disk cache", entry.name, entry.size_bytes)

    def _delete(self, name: str) -> None:
        """Remove an entry at once (lock held); a crash mid-way leaves only a leftover."""
        self._index().pop(name, None)
        doomed = self.root / f".{name}.evicted"
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.root / name, doomed)
        _remove(doomed)

    def _evict_unheld(self, room: int) -> None:
        """Delete unheld entries, least recently used first, till ``room`` more fits (lock held)."""
        for entry in self._by_recency():
            if self._used() + room <= self.max_bytes:
                return
            if entry.name not in self._held:
                self._evict(entry)

    def _used(self) -> int:
        """Bytes of the entries and of the fetches in progress (lock held)."""
        return sum(e.size_bytes for e in self._index().values()) + sum(self._reserved.values())

    def _by_recency(self) -> list[CacheEntry]:
        """The entries, least recently used first, touches included (lock held)."""
        touched = self._touched
        entries = [
            dataclasses.replace(e, last_used=max(e.last_used, touched.get(e.name, 0.0)))
            for e in self._index().values()
        ]
        return sorted(entries, key=lambda e: (e.last_used, e.name))

    def _publish(self) -> None:
        CACHE_BYTES.set(sum(e.size_bytes for e in self._index().values()))

    def _index(self) -> dict[str, CacheEntry]:
        """The entries, scanned from disk on first use (lock held)."""
        if self._entries is None:
            self._entries = _scan(self.root)
            self._publish()
        return self._entries


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise InvalidEntryName(name)


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED_FILES)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _scan(root: Path) -> dict[str, CacheEntry]:
    """Complete entries under ``root``; temp files of fetches that died are removed."""
    entries: dict[str, CacheEntry] = {}
    if not root.is_dir():
        return entries
    for path in root.iterdir():
        if _is_fetch_leftover(path):
            _remove(path)
        elif path.is_dir() and _complete(path):
            entries[path.name] = CacheEntry(path.name, _dir_bytes(path), path.stat().st_mtime)
    return entries


def _is_fetch_leftover(path: Path) -> bool:
    # Registry.fetch_version stages as ".<name>.<random>" (+ ".tar") beside the entry.
    return path.name.startswith(".") and path.name.count(".") >= 2


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
