"""vLLM general plugin: the loraplex LoRA resolver (entry point ``vllm.general_plugins``).

vLLM calls ``register()`` in every engine process where loraplex is
installed. It does nothing unless ``LORAPLEX_RESOLVER_DATABASE_URL`` is set,
so installing loraplex never changes a plain vLLM deployment; importing this
module imports neither vLLM nor the registry.

With the variable set, vLLM asks the resolver about every model name it does
not know. LoRA names (``lx-`` + 16 hex digits, see ``registry.lora_names``)
are looked up in the registry, checked against the base this engine serves,
fetched into a verified, size-bounded disk cache and handed to vLLM as a
``LoRARequest``.
Anything else is declined, and vLLM answers its own 404.

The disk cache stays within its bound while the engine runs: when a fetch
needs room that adapters vLLM loaded take, the resolver unloads the least
recently used of them that no request uses (``engine_loras``: out of vLLM's
table of LoRAs, then out of its engine core), deletes it, and fetches; the next
request for an unloaded adapter resolves it again, as on a cold start.

A failure to fetch a known adapter (blob store down, slow or corrupt; disk
full; database down; the cache full of adapters that requests in flight use
until the fetch timeout) raises vLLM's ``GracefulHTTPError`` with status 503, so
the client sees ``{"error": {"type": "Service Unavailable", "code": 503, ...}}``
and the gateway may retry on another replica. An adapter that could never fit
in the cache gets a 400 that says so: retrying cannot help.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.request import LoRARequest

    from registry import BlobStore, Registry, VersionBlob
    from server.engine_plugin.adapter_cache import AdapterCache, Fetch
    from server.engine_plugin.engine_loras import EngineLoras

T = TypeVar("T")

log = logging.getLogger(__name__)

RESOLVER_NAME = "loraplex"
"""The name the resolver is registered under in vLLM's ``LoRAResolverRegistry``."""

# -- environment -------------------------------------------------------------

DATABASE_URL_ENV = "LORAPLEX_RESOLVER_DATABASE_URL"
"""Registry database URL (``sqlite:///...`` or ``postgresql://...``). Required; unset
means the plugin does nothing. The schema must already be migrated (the gateway does it)."""
BLOB_URL_ENV = "LORAPLEX_RESOLVER_BLOB_URL"
"""Blob store: an existing local directory or ``s3://bucket/prefix``. Required."""
S3_ENDPOINT_ENV = "LORAPLEX_S3_ENDPOINT_URL"
"""S3 endpoint for S3-compatible stores (SeaweedFS, MinIO). Optional; boto3 reads the
credentials from the usual ``AWS_*`` variables."""
BASE_FINGERPRINT_ENV = "LORAPLEX_RESOLVER_BASE_FINGERPRINT"
"""Fingerprint (64 hex digits) of the registered base model this engine serves. Required:
versions pinned to another base are never served here."""
CACHE_DIR_ENV = "LORAPLEX_RESOLVER_CACHE_DIR"
"""Directory of the adapter disk cache, one per engine. Default: ~/.cache/loraplex/adapters."""
CACHE_BYTES_ENV = "LORAPLEX_RESOLVER_CACHE_BYTES"
"""Size bound of the disk cache: bytes, or with a K/M/G/T suffix (powers of 1024).
Default: 10G."""
FETCH_TIMEOUT_ENV = "LORAPLEX_RESOLVER_FETCH_TIMEOUT"
"""Seconds one resolution (registry lookup + fetch) may take before the request fails
with 503. Default: 120."""

DEFAULT_CACHE_DIR = Path("~/.cache/loraplex/adapters")
DEFAULT_CACHE_BYTES = 10 << 30
DEFAULT_FETCH_TIMEOUT = 120.0
ROOM_POLL_SECONDS = 0.05
"""How often a fetch waiting for room checks again whether an adapter fell out of use."""

FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ResolverConfigError(ValueError):
    """The resolver's environment is invalid; ``problems`` names each bad variable.

    Its own class, not the gateway's ``SettingsError``: the engine process imports
    nothing of ``server`` outside this package."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid loraplex resolver settings:\n{lines}")


class WrongBase(Exception):
    """The model vLLM serves is not the base the resolver was told it serves."""

    def __init__(self, model: str, served: str, declared: str) -> None:
        super().__init__(
            f"this engine serves {model} (base fingerprint {served}), but "
            f"{BASE_FINGERPRINT_ENV} is {declared}; set it to the served base's fingerprint"
        )


@dataclass(frozen=True)
class ResolverConfig:
    """Everything the resolver needs, read from ``LORAPLEX_RESOLVER_*`` variables."""

    database_url: str
    """Registry database URL (``LORAPLEX_RESOLVER_DATABASE_URL``)."""
    blob_url: str
    """Local blob directory or ``s3://bucket/prefix`` (``LORAPLEX_RESOLVER_BLOB_URL``)."""
    base_fingerprint: str
    """Fingerprint of the base this engine serves (``LORAPLEX_RESOLVER_BASE_FINGERPRINT``)."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Disk cache directory (``LORAPLEX_RESOLVER_CACHE_DIR``)."""
    cache_bytes: int = DEFAULT_CACHE_BYTES
    """Disk cache size bound in bytes (``LORAPLEX_RESOLVER_CACHE_BYTES``)."""
    s3_endpoint_url: str | None = None
    """S3 endpoint of an S3-compatible store (``LORAPLEX_S3_ENDPOINT_URL``)."""
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    """Seconds one resolution may take (``LORAPLEX_RESOLVER_FETCH_TIMEOUT``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ResolverConfig:
        """Read and check every variable; raises ``ResolverConfigError`` listing all problems."""
        problems: list[str] = []
        config = cls(
            database_url=_required(env, DATABASE_URL_ENV, problems),
            blob_url=_required(env, BLOB_URL_ENV, problems),
            base_fingerprint=_fingerprint(env, problems),
            cache_dir=Path(env.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser(),
            cache_bytes=_size(env, problems),
            s3_endpoint_url=env.get(S3_ENDPOINT_ENV) or None,
            fetch_timeout=_timeout(env, problems),
        )
        if problems:
            raise ResolverConfigError(problems)
        return config


def _required(env: Mapping[str, str], name: str, problems: list[str]) -> str:
    value = env.get(name, "").strip()
    if not value:
        problems.append(f"{name} is not set; the resolver needs it")
    return value


def _fingerprint(env: Mapping[str, str], problems: list[str]) -> str:
    value = _required(env, BASE_FINGERPRINT_ENV, problems).lower()
    if value and not FINGERPRINT.fullmatch(value):
        problems.append(
            f"{BASE_FINGERPRINT_ENV}={value!r} is not a base fingerprint (64 hex digits); "
            "copy it from `loraplex bases list` or the registry's base record"
        )
    return value


def _size(env: Mapping[str, str], problems: list[str]) -> int:
    raw = env.get(CACHE_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_CACHE_BYTES
    match = _SIZE.fullmatch(raw)
    size = int(match[1]) * _UNITS[match[2].upper()] if match else 0
    if size < 1:
        problems.append(
            f"{CACHE_BYTES_ENV}={raw!r} is not a positive size; give bytes, e.g. 10737418240 or 10G"
        )
    return size


def _timeout(env: Mapping[str, str], problems: list[str]) -> float:
    raw = env.get(FETCH_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_FETCH_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        problems.append(f"{FETCH_TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return seconds


# -- the resolver ----------------------------------------------------------------


def lora_int_id(fingerprint: str) -> int:
    """A stable positive 31-bit id from a fingerprint (vLLM replaces it with its own counter)."""
    return int(fingerprint[:8], 16) % ((1 << 31) - 1) + 1


class LoraplexResolver:
    """Resolves LoRA names through the registry and the disk cache.

    A ``vllm.lora.resolver.LoRAResolver`` by shape (vLLM only calls
    ``resolve_lora``), so this module does not import vLLM until it runs.
    """

    def __init__(
        self,
        registry: Registry,
        cache: AdapterCache,
        base_fingerprint: str,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.base_fingerprint = base_fingerprint
        self.fetch_timeout = fetch_timeout
        self.engine: EngineLoras | None = None
        """vLLM's table of LoRAs and engine core, once a resolution came through them."""
        self._checked_bases: set[str] = set()
        self._unlinked_logged = False
        # One eviction at a time, so two fetches never pick the same adapter to unload.
        self._room = asyncio.Lock()
        # Our own threads: a hung blob store must not tie up vLLM's default executor.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loraplex-resolver")

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The LoRA request for ``lora_name``; None for names that are not ours to serve.

        Raises vLLM's ``GracefulHTTPError``: HTTP 503 when a servable adapter
        cannot be fetched in time or at all, 400 when it can never fit the cache.
        """
        # Not at module level: the registry package is heavy, and by now it is loaded.
        from registry.lora_names import is_lora_name
        from server.engine_plugin.adapter_cache import AdapterTooLarge
        from server.engine_plugin.engine_loras import calling_serving_models

        if not is_lora_name(lora_name):
            return None
        self._link(calling_serving_models())
        deadline = asyncio.get_running_loop().time() + self.fetch_timeout
        try:
            located = await self._resolve(base_model_name, lora_name, deadline)
        except TimeoutError:
            raise _unavailable(lora_name, f"not fetched within {self.fetch_timeout:g} s") from None
        except AdapterTooLarge as exc:
            raise _too_large(str(exc)) from exc
        except Exception as exc:
            raise _unavailable(lora_name, str(exc)) from exc
        if located is None:
            return None
        fingerprint, path = located
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=lora_name, lora_int_id=lora_int_id(fingerprint), lora_path=str(path)
        )

    def _link(self, models: OpenAIServingModels | None) -> None:
        """Watch the vLLM table of LoRAs that this resolution will fill."""
        if models is None:
            if not self._unlinked_logged:
                self._unlinked_logged = True
                log.warning(
                    "the resolver was not called by vLLM's OpenAIServingModels; adapters it "
                    "resolves cannot be unloaded, so the disk cache fills up and then refuses"
                )
            return
        if self.engine is None or self.engine.models is not models:
            from server.engine_plugin.engine_loras import EngineLoras

            self.engine = EngineLoras(models, self.cache.touch)

    async def _resolve(
        self, base_model_name: str, name: str, deadline: float
    ) -> tuple[str, Path] | None:
        """(fingerprint, cached directory) of a servable version."""
        found = await self._in_thread(deadline, self._lookup, base_model_name, name)
        if found is None:
            return None
        # The record just read goes to the fetch: a cold start pays for one lookup, not two.
        fetch = functools.partial(self.registry.fetch_version, found=found)
        path = await self._cached(name, fetch, found.size_bytes, deadline)
        return found.version.fingerprint, path

    def _lookup(self, base_model_name: str, name: str) -> VersionBlob | None:
        """The version ``name`` refers to, if this engine may serve it (blocking: the DB)."""
        self._check_served_base(base_model_name)
        found = self.registry.version_by_lora_name(name)
        if found is None:
            return None
        if found.base.fingerprint != self.base_fingerprint:
            log.warning(
                "not serving adapter %s: it is pinned to base %s@%s (%s), this engine serves %s",
                name,
                found.base.name,
                found.base.revision,
                found.base.fingerprint,
                self.base_fingerprint,
            )
            return None
        return found

    async def _cached(self, name: str, fetch: Fetch, size_bytes: int, deadline: float) -> Path:
        """``name``'s cache entry, unloading adapters from the engine when they take its room."""
        from server.engine_plugin.adapter_cache import CacheFull

        collected = False
        while True:
            try:
                return await self._in_thread(deadline, self.cache.get, name, fetch, size_bytes)
            except CacheFull as full:
                if await self._unload_for(full.short, name):
                    continue
                if not collected:
                    # A finished request caught in a reference cycle (an exception's
                    # traceback) keeps its adapter looking used until the collector runs.
                    # The young generations only: a full collection stalls vLLM's event
                    # loop for a good part of a second.
                    gc.collect(1)
                    collected = True
                    continue
                if asyncio.get_running_loop().time() + ROOM_POLL_SECONDS >= deadline:
                    raise  # its own message, not a timeout's: the room is what is missing
                await asyncio.sleep(ROOM_POLL_SECONDS)

    async def _unload_for(self, short: int, keep: str) -> bool:
        """Unload and evict least recently used adapters no request uses, until ``short``
        bytes are freed; whether any were."""
        if self.engine is None:
            return False
        freed = 0
        async with self._room:
            for entry in self.cache.held():
                if freed >= short:
                    break
                if entry.name != keep and await self.engine.unload(entry.name, self._evict):
                    freed += entry.size_bytes
        return freed > 0

    async def _evict(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.cache.evict, name)

    async def _in_thread(self, deadline: float, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` in our threads; TimeoutError past ``deadline`` (the thread runs on)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, work, *args)
        return await asyncio.wait_for(future, max(0.0, deadline - loop.time()))

    def _check_served_base(self, base_model_name: str) -> None:
        """Serve nothing if the model vLLM loaded is not the base this engine declares.

        vLLM passes its ``--model`` value; a local directory is fingerprinted once
        (config, tokenizer and weight index: no weight bytes). Hub ids are trusted.
        """
        if base_model_name in self._checked_bases or not Path(base_model_name).is_dir():
            return
        from registry.fingerprint import fingerprint_base

        served = fingerprint_base(Path(base_model_name)).fingerprint
        if served != self.base_fingerprint:
            raise WrongBase(base_model_name, served, self.base_fingerprint)
        self._checked_bases.add(base_model_name)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.registry.close()


def _unavailable(name: str, reason: str) -> Exception:
    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(
        f"adapter {name} is temporarily unavailable on this engine ({reason}); "
        "retry, or send the request to another replica",
        HTTPStatus.SERVICE_UNAVAILABLE,
    )


def _too_large(reason: str) -> Exception:
    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(f"cannot serve {reason}", HTTPStatus.BAD_REQUEST)


# -- building it -----------------------------------------------------------------


def build_resolver(config: ResolverConfig) -> LoraplexResolver:
    """The resolver for ``config``, after checking the database, blob store and cache dir.

    Raises ``ResolverConfigError`` naming the variable at fault.
    """
    from registry import Registry
    from server.engine_plugin.adapter_cache import AdapterCache

    blobs = _open_blobs(config)
    try:
        registry = Registry(config.database_url, blobs, auto_migrate=False)
    except Exception as exc:
        raise ResolverConfigError([f"{DATABASE_URL_ENV} is unusable: {exc}"]) from exc
    try:
        _check_base(registry, config.base_fingerprint)
        _check_cache_dir(config.cache_dir.expanduser())
    except ResolverConfigError:
        registry.close()
        raise
    # vLLM may fork after plugins load; no connection opened by the checks may cross it.
    registry.database.dispose()
    cache = AdapterCache(config.cache_dir.expanduser(), config.cache_bytes)
    return LoraplexResolver(registry, cache, config.base_fingerprint, config.fetch_timeout)


def _open_blobs(config: ResolverConfig) -> BlobStore:
    from registry import S3BlobStore, open_blob_store

    url = config.blob_url
    if not url.startswith("s3://") and not Path(url).expanduser().is_dir():
        raise ResolverConfigError(
            [f"{BLOB_URL_ENV}={url!r} is not a directory; use the registry's"]
        )
    try:
        store = open_blob_store(url, config.s3_endpoint_url)
        if isinstance(store, S3BlobStore):
            store.client.head_bucket(Bucket=store.bucket)
    except Exception as exc:
        raise ResolverConfigError(
            [f"{BLOB_URL_ENV}={url!r} (with {S3_ENDPOINT_ENV}) is unreachable: {exc}"]
        ) from exc
    return store


def _check_base(registry: Registry, fingerprint: str) -> None:
    try:
        bases = registry.list_bases()
    except Exception as exc:
        raise ResolverConfigError(
            [f"{DATABASE_URL_ENV}: cannot read the registry (is it reachable and migrated?): {exc}"]
        ) from exc
    if not any(base.fingerprint == fingerprint for base in bases):
        raise ResolverConfigError(
            [f"{BASE_FINGERPRINT_ENV}={fingerprint} names no base registered in this registry"]
        )


def _check_cache_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResolverConfigError(
            [f"{CACHE_DIR_ENV}={str(path)!r} cannot be created: {exc}"]
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ResolverConfigError([f"{CACHE_DIR_ENV}={str(path)!r} is not writable"])


def register() -> None:
    """vLLM's entry point: register the resolver when ``LORAPLEX_RESOLVER_DATABASE_URL`` is set.

    A bad configuration raises ``ResolverConfigError``, which stops the engine. In every
    process vLLM loads it in, it also fixes the CPU LoRA ops (``cpu_lora``).
    """
    from server.engine_plugin import cpu_lora

    cpu_lora.install()
    if not os.environ.get(DATABASE_URL_ENV):
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    resolver = build_resolver(ResolverConfig.from_env(os.environ))
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)  # type: ignore[arg-type]
    log.info("loraplex LoRA resolver registered (cache %s)", resolver.cache.root)
