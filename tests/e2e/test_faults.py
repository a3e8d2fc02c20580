"""Fault injection against real parts: SeaweedFS S3 down or stalled during a cold adapter load,
the adapter cache's disk full, and a private PostgreSQL restarted under traffic.

Each fault expects a clean answer while it lasts (503 + ``Retry-After``,
OpenAI-shaped), a cache holding only complete, uncorrupted entries, and
success once the fault is gone, with no restart of the gateway.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import TENANT_SCOPE, LocalBlobStore, Registry, S3BlobStore
from server.dev.seaweed import SeaweedFS
from tests import reliability
from tests.e2e.conftest import ENGINE_ARGS, OPERATOR, make_tenant
from tests.e2e.serving import ServeProcess, free_port
from tests.registry.registry_testdata import build_adapter

BUCKET = "loraplex-faults"
S3_KEY, S3_SECRET = "faults-key", "faults-secret"
FETCH_TIMEOUT = 8  # seconds the engine's resolver waits for a fetch before answering 503
CACHE_DISK = "4m"  # the cache's own tmpfs: small enough to fill in a moment


# -- an engine whose blobs live in SeaweedFS and whose cache lives on a tiny tmpfs ----------


@dataclass
class S3Serve:
    serve: ServeProcess
    weed: SeaweedFS
    registry: Registry
    cache: Path
    key: str
    versions: dict[int, str]
    """Version number -> engine-side name of tenant's adapter ``bot``."""

    def complete(self, model: str, stream: bool = False) -> httpx.Response:
        body: dict[str, Any] = {"model": model, "prompt": "Hi", "max_tokens": 2, "stream": stream}
        return httpx.post(
            self.serve.url + "/v1/completions",
            json=body,
            headers={"authorization": f"Bearer {self.key}"},
            timeout=120,
        )


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.fixture(scope="module")
def s3_serve(demo_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Serve]:
    root = tmp_path_factory.mktemp("faults-s3")
    weed = SeaweedFS(root / "weed", BUCKET, S3_KEY, S3_SECRET).start()
    home = root / "serve"
    cache = home / "adapter-cache" / "engine-0"  # where serve puts engine 0's cache
    # The tmpfs holds the cache dir, so a filler file beside it can fill the cache's disk.
    _mount_tmpfs(cache.parent, CACHE_DISK)
    serve = ServeProcess(
        home,
        args=["--base-model", str(demo_base), "--engine-port", str(free_port()), *ENGINE_ARGS],
        env={
            "LORAPLEX_BLOB_URL": f"s3://{BUCKET}/blobs",
            "LORAPLEX_S3_ENDPOINT_URL": weed.endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "LORAPLEX_RESOLVER_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
        },
    )
    registry: Registry | None = None
    try:
        serve.start().wait_ready()
        blobs = S3BlobStore(BUCKET, "blobs", endpoint_url=weed.endpoint, client=weed.client())
        registry = Registry(f"sqlite:///{home / 'registry.db'}", blobs)
        tenant = make_tenant(registry, "s3-tenant")
        versions = {}
        for seed in (1, 2, 3, 4):
            path = build_adapter(demo_base, root / f"adapter-{seed}", seed=seed, r=8)
            pushed = registry.push_adapter(tenant.tenant_id, "bot", path, demo_base.name, OPERATOR)
            versions[pushed.number] = pushed.lora_name
        yield S3Serve(serve, weed, registry, cache, tenant.key, versions)
    finally:
        if serve.process is not None:
            assert serve.stop(), serve.log_tail()
        if registry is not None:
            registry.close()
        weed.stop()
        subprocess.run(["umount", "-l", str(cache.parent)], check=False)


def _clean_503(response: httpx.Response) -> bool:
    """A retryable, OpenAI-shaped 503: what a client may see while the store or disk fails."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        response.status_code == 503
        and int(response.headers.get("retry-after", "0")) >= 1
        and error.get("code") == "adapter_unavailable"
        and {"message", "type", "param", "code"} <= set(error)
    )


def _served(response: httpx.Response, stream: bool) -> bool:
    if response.status_code != 200:
        return False
    if stream:
        return response.text.rstrip().endswith("data: [DONE]")
    return bool(response.json()["choices"])


def cache_problems(setup: S3Serve) -> list[str]:
    """Leftovers, incomplete entries, and entries whose bytes differ from a fresh fetch."""
    problems = []
    with tempfile.TemporaryDirectory() as fresh:
        for path in sorted(setup.cache.iterdir()):
            if path.name.startswith("."):
                problems.append(f"leftover {path.name}")
                continue
            reference = setup.registry.fetch_version(path.name, Path(fresh))
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if not (path / name).is_file():
                    problems.append(f"{path.name} lacks {name}")
                elif not filecmp.cmp(path / name, reference / name, shallow=False):
                    problems.append(f"{path.name}/{name} differs from the blob")
    return problems


def _cold_load_under_fault(
    setup: S3Serve, number: int, fault_on: Any, fault_off: Any, check: str
) -> None:
    """Both kinds of request for a never-loaded version during a fault, then after it."""
    lora_name = setup.versions[number]
    assert not (setup.cache / lora_name).exists()
    fault_on()
    try:
        during = [setup.complete(f"bot@{number}", stream) for stream in (False, True)]
        problems_during = cache_problems_without_store(setup)
    finally:
        fault_off()
    after = [setup.complete(f"bot@{number}", stream) for stream in (False, True)]
    problems = problems_during + cache_problems(setup)
    unclean = sum(not _clean_503(r) for r in during)
    unrecovered = sum(not _served(r, s) for r, s in zip(after, (False, True), strict=True))
    reliability.record(
        "faults",
        check,
        len(during),
        "faulted requests",
        unclean + unrecovered + len(problems),
        "unclean answers, failed recoveries or bad cache entries",
    )
    assert unclean == 0, [(r.status_code, r.headers.get("retry-after"), r.text) for r in during]
    assert problems == []
    assert unrecovered == 0, [(r.status_code, r.text[:300]) for r in after]
    assert (setup.cache / lora_name / "adapter_model.safetensors").is_file()


def cache_problems_without_store(setup: S3Serve) -> list[str]:
    """While the store is unusable: entries (not scratch files) that are incomplete.

    A stalled fetch still holds its scratch file (``.<name>.<random>``) beside the
    entry; only a visible entry without all its files would be a half-written one.
    """
    return [
        f"{path.name} is incomplete"
        for path in sorted(setup.cache.iterdir())
        if not path.name.startswith(".") and not (path / "adapter_model.safetensors").is_file()
    ]


@pytest.mark.reliability
def test_s3_down_during_a_cold_load_is_a_clean_503_then_succeeds(s3_serve: S3Serve) -> None:
    weed = s3_serve.weed
    _cold_load_under_fault(
        s3_serve, 1, weed.stop, weed.start, "S3 store down during a cold adapter load"
    )


@pytest.mark.reliability
def test_s3_stalled_during_a_cold_load_is_a_clean_503_then_succeeds(s3_serve: S3Serve) -> None:
    weed = s3_serve.weed
    assert weed.process is not None
    pid = weed.process.pid
    # SIGSTOP: connections are still accepted by the kernel, but nothing answers (a hung store).
    _cold_load_under_fault(
        s3_serve,
        2,
        lambda: os.kill(pid, signal.SIGSTOP),
        lambda: os.kill(pid, signal.SIGCONT),
        f"S3 store stalled during a cold adapter load (>{FETCH_TIMEOUT} s)",
    )


def _fill(filler: Path, leave: int) -> None:
    """Write ``filler`` until only about ``leave`` bytes are free on its disk."""
    stat = os.statvfs(filler.parent)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.mark.reliability
def test_full_cache_disk_is_a_clean_503_keeps_the_cache_and_recovers(s3_serve: S3Serve) -> None:
    warm = s3_serve.complete("bot@4")  # an entry to keep intact while the disk is full
    assert _served(warm, False), warm.text
    filler = s3_serve.cache.parent / "filler"  # beside the cache dir, on the same disk
    _fill(filler, leave=16 << 10)
    try:
        during = [s3_serve.complete("bot@3", stream) for stream in (False, True)]
        still_warm = s3_serve.complete("bot@4")
        problems = cache_problems(s3_serve)
    finally:
        filler.unlink()
    after = s3_serve.complete("bot@3")
    problems += cache_problems(s3_serve)
    unclean = sum(not _clean_503(r) for r in during) + (not _served(still_warm, False))
    reliability.record(
        "faults",
        "adapter cache disk full during a cold adapter load",
        len(during) + 1,
        "faulted requests",
        unclean + (not _served(after, False)) + len(problems),
        "unclean answers, failed recoveries or bad cache entries",
    )
    assert unclean == 0, [(r.status_code, r.text[:300]) for r in [*during, still_warm]]
    assert problems == []
    assert _served(after, False), after.text
    assert (s3_serve.cache / s3_serve.versions[3] / "adapter_model.safetensors").is_file()


# -- PostgreSQL restarted under traffic ---------------------------------------------------


def _pg_bin(tool: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))
    assert found, f"PostgreSQL's {tool} not found under /usr/lib/postgresql"
    return str(found[-1])


@dataclass
class PrivatePostgres:
    """A throwaway PostgreSQL cluster of our own, which we may stop and start at will."""

    root: Path
    port: int

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> PrivatePostgres:
        shutil.chown(self.root, "postgres", "postgres")
        data = str(self.root / "data")
        self._as_postgres(_pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        data, log = str(self.root / "data"), str(self.root / "pg.log")
        self._as_postgres(_pg_bin("pg_ctl"), "-D", data, "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "stop")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
    pg = PrivatePostgres(root, free_port()).init()
    pg.start()
    try:
        yield pg
    finally:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                _pg_bin("pg_ctl"),
                "-D",
                str(root / "data"),
                "-m",
                "immediate",
                "stop",
            ],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Traffic:
    """Requests sent in a loop by a few threads: (sent at, status or exception name, clean?)."""

    url: str
    key: str
    model: str
    seen: list[tuple[float, str, bool]]
    stop: threading.Event

    def run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = http.post(
                        self.url + "/v1/completions",
                        json={"model": self.model, "prompt": "Hi", "max_tokens": 1},
                        headers={"authorization": f"Bearer {self.key}"},
                    )
                    self.seen.append((sent, str(r.status_code), _openai_shaped(r)))
                except httpx.HTTPError as exc:
                    self.seen.append((sent, type(exc).__name__, False))


def _openai_shaped(response: httpx.Response) -> bool:
    if response.status_code == 200:
        return True
    try:
        return {"message", "type", "param", "code"} <= set(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return False


def _with_a_new_key(
    serve: ServeProcess, registry: Registry, tenant_id: int, model: str
) -> httpx.Response:
    """A request with a key created just now: only a gateway that reads the database again
    (after its restart) can know it."""
    registry.database.dispose()
    _, new_key = registry.create_api_key(tenant_id, TENANT_SCOPE, OPERATOR)
    return httpx.post(
        serve.url + "/v1/completions",
        json={"model": model, "prompt": "Hi", "max_tokens": 1},
        headers={"authorization": f"Bearer {new_key}"},
        timeout=60,
    )


def _restart_under(traffic: Traffic, pg: PrivatePostgres) -> tuple[int, float, float]:
    """Stop PostgreSQL for 4 s under 4 threads of traffic; (threads hung, down at, back at)."""
    threads = [threading.Thread(target=traffic.run) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        pg.stop()
        down_at = time.monotonic()
        time.sleep(4)  # the database is gone for a while, not just for a blink
        pg.start()
        back_at = time.monotonic()
        time.sleep(8)
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(timeout=90)
    return sum(t.is_alive() for t in threads), down_at, back_at


@pytest.mark.reliability
def test_postgres_restarted_under_traffic_gateway_recovers_without_restart(
    gateway: ServeProcess,
    engine_port: int,
    engine_key: str,
    demo_base: Path,
    private_pg: PrivatePostgres,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A second gateway, on the private database, in front of the session's engine.
    serve = ServeProcess(
        tmp_path / "serve",
        args=["--base-model", str(demo_base), "--engine-urls", f"http://127.0.0.1:{engine_port}"],
        env={"LORAPLEX_ENGINE_API_KEY": engine_key, "LORAPLEX_DATABASE_URL": private_pg.url},
    ).start()
    registry = Registry(private_pg.url, LocalBlobStore(tmp_path / "serve" / "blobs"))
    try:
        serve.wait_ready(timeout=120)
        tenant = make_tenant(registry, "pg-tenant")
        seen: list[tuple[float, str, bool]] = []
        traffic = Traffic(serve.url, tenant.key, demo_base.name, seen, threading.Event())
        hung, down_at, back_at = _restart_under(traffic, private_pg)
        fresh = _with_a_new_key(serve, registry, tenant.tenant_id, demo_base.name)
        assert serve.process is not None
        still_running = serve.process.poll() is None
    finally:
        registry.close()
        stopped_cleanly = serve.stop()

    settled = [s for at, s, _ in seen if at > back_at + 3]
    unsettled_failures = sum(s != "200" for s in settled)
    unshaped = sum(not clean for _, _, clean in seen)
    # A database outage must never pass for the client's fault (401 bad key, 404 no model).
    misblamed = sum(s.startswith("4") for _, s, _ in seen)
    # ... nor for a gateway bug (500): it is a retryable 503 with Retry-After.
    unretryable = sum(s not in ("200", "503") for _, s, _ in seen)
    during = [s for at, s, _ in seen if down_at <= at <= back_at]
    with capsys.disabled():
        print(
            f"\n[postgres restart] {len(seen)} requests; during the outage: "
            f"{ {s: during.count(s) for s in set(during)} }; "
            f"after it settled: {len(settled)} ({unsettled_failures} failed)"
        )
    bad = hung + unshaped + unretryable + unsettled_failures
    bad += (fresh.status_code != 200) + (not still_running)
    reliability.record(
        "faults",
        "PostgreSQL stopped 4 s and restarted under traffic",
        len(seen),
        "requests",
        bad,
        "hangs, unshaped or non-503 errors, or failures once it was back",
    )
    assert hung == 0
    assert still_running and stopped_cleanly
    assert unshaped == 0, [s for _, s, clean in seen if not clean][:10]
    assert misblamed == 0, [s for _, s, _ in seen if s.startswith("4")][:10]
    assert unretryable == 0, [s for _, s, _ in seen if s not in ("200", "503")][:10]
    assert settled and unsettled_failures == 0, settled
    assert fresh.status_code == 200, fresh.text
