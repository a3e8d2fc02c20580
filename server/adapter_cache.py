"""The engine's adapter disk cache: size-bounded, least recently used out first.

Each entry is a directory ``<root>/<engine name>/`` holding a verified
adapter. The ``fetch`` callable (``Registry.fetch_version``) writes it
atomically (verified temp file, staging directory, rename), so an entry is
either complete or absent. Recency is the entry directory's mtime, touched on
every use, so a restarted engine finds the cache as it left it.

Entries handed out are *held* until ``release``: vLLM keeps the path of every
adapter it resolved for its whole life and re-reads it whenever its own
memory LRU dropped the adapter, so deleting a held entry would break the
engine. ``max_bytes`` therefore bounds everything but the held entries.

One cache root belongs to one engine process: holds are not shared between
processes.
"""

from __future__ import annotations

import contextlib
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

log = logging.getLogger(__name__)

Fetch = Callable[[str, Path], Path]
"""Writes adapter ``name`` atomically as ``dest_dir/name`` and returns that directory."""

# Registered once per process in the default registry, which vLLM's /metrics serves.
CACHE_HITS = Counter(
    "loraplex_adapter_cache_hits", "Adapter resolutions served from the engine's disk cache."
)
CACHE_MISSES = Counter(
    "loraplex_adapter_cache_misses", "Adapter resolutions that had to fetch from the blob store."
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


class InvalidEntryName(AdapterCacheError, ValueError):
    """A name that cannot be a cache entry (it would escape the root or look like a temp file)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name!r} cannot name a cache entry; use an engine-side adapter name (lx-...)"
        )


@dataclass(frozen=True)
class CacheEntry:
    """One adapter in the cache."""

    name: str
    """The engine-side adapter name, which is also the directory name."""
    size_bytes: int
    """Bytes of the adapter's files."""
    last_used: float
    """When it was last handed out (seconds since the epoch; the directory's mtime)."""


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

    def get(self, name: str, fetch: Fetch) -> Path:
        """The directory of adapter ``name``, fetched on a miss; held until ``release(name)``.

        Concurrent calls for one name fetch it once. Raises ``AdapterFetchFailed``
        when the fetch fails (the cache is left without any part of the entry).
        """
        _check_name(name)
        with self._lock:
            # Scan (and clear leftovers) before any fetch of ours starts, so the scan
            # never mistakes a concurrent fetch's scratch files for leftovers.
            self._index()
        with self._name_lock(name):
            was_held = self._hold(name)
            try:
                path = self._ensure(name, fetch)
                self._use(name, path)
            except BaseException:
                if not was_held:
                    self.release(name)
                raise
        return path

    def release(self, name: str) -> None:
        """Let ``name`` be evicted again (its user no longer reads the directory)."""
        with self._lock:
            self._held.discard(name)

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        with self._lock:
            return sorted(self._index().values(), key=lambda e: (e.last_used, e.name))

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

    def _ensure(self, name: str, fetch: Fetch) -> Path:
        path = self.root / name
        if self._is_cached(name, path):
            CACHE_HITS.inc()
        else:
            CACHE_MISSES.inc()
            self._fetch(name, path, fetch)
        return path

    def _is_cached(self, name: str, path: Path) -> bool:
        if _complete(path):
            return True
        if path.exists():  # damaged behind our back: fetch it again
            log.warning("adapter cache entry %s is incomplete; fetching it again", path)
            self._forget(name)
        return False

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
            self._evict_over_budget()
            CACHE_BYTES.set(sum(e.size_bytes for e in self._index().values()))

    def _forget(self, name: str) -> None:
        with self._lock:
            self._delete(name)

    def _delete(self, name: str) -> None:
        """Remove an entry at once (lock held); a crash mid-way leaves only a leftover."""
        self._index().pop(name, None)
        doomed = self.root / f".{name}.evicted"
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.root / name, doomed)
        _remove(doomed)

    def _evict_over_budget(self) -> None:
        """Drop least recently used, unheld entries until the total fits (lock held)."""
        index = self._index()
        total = sum(e.size_bytes for e in index.values())
        for entry in sorted(index.values(), key=lambda e: (e.last_used, e.name)):
            if total <= self.max_bytes:
                return
            if entry.name in self._held:
                continue
            self._delete(entry.name)
            total -= entry.size_bytes
            log.info(
                "evicted adapter %s (%d bytes) from the disk cache", entry.name, entry.size_bytes
            )
        if total > self.max_bytes:
            log.warning(
                "adapter cache holds %d bytes, over its %d-byte bound: the rest is in use "
                "by this engine; restart it or raise the bound",
                total,
                self.max_bytes,
            )

    def _index(self) -> dict[str, CacheEntry]:
        """The entries, scanned from disk on first use (lock held)."""
        if self._entries is None:
            self._entries = _scan(self.root)
            CACHE_BYTES.set(sum(e.size_bytes for e in self._entries.values()))
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
