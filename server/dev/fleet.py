"""``make fleet``: the production topology as real processes on one machine's loopback.

Two bases (the demo base and a smaller one, built locally), a vLLM engine per
base, two gateways in front of both, a fine-tuning worker per base, Redis (the
machine's server; a database of the fleet's own) for the tenant limits every
gateway shares, PostgreSQL (the machine's server; a fresh database) and
SeaweedFS as the S3 blob store: the same processes, commands and settings as
the Kubernetes manifests in ``deploy/k8s``, only addressed on 127.0.0.1. As there:

- the registry schema is migrated once by ``loraplex migrate`` (the Job);
- engines run vLLM directly with the resolver plugin configured by environment,
  each with its own adapter cache, and fetch adapters from S3 by content;
- gateways find engines through ``--engine-discovery`` (a file here, a headless
  Service's DNS name there), ask each engine which base it serves, hold no state
  of their own and can be killed at will;
- nothing restarts a killed process by itself: that is the orchestrator's job,
  done here by calling ``start()`` again.

``tests/e2e/test_fleet.py`` drives this class; ``python -m server.dev.fleet`` (what
``make fleet`` runs) starts it, prints where everything listens and how to
try it, and stops it all on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from registry import TENANT_SCOPE, Actor, Registry, open_blob_store
from server.config import Settings
from server.dev.local_server import free_port as free_port  # callers import it from here
from server.dev.process import Process
from server.dev.seaweed import SeaweedFS
from server.gateway.engines import engine_command, engine_environment, resolver_environment
from training.demo_base import DemoBaseConfig

SMALL_BASE = DemoBaseConfig(hidden_size=128, num_heads=2, intermediate_size=384, train_steps=60)
"""The fleet's second base: a narrower demo base (head size 64, as vLLM's CPU kernels need),
quicker to build; its adapters have other shapes, so nothing crosses between the two."""

OPERATOR = Actor("fleet:operator", admin=True)
LOADER = Path(sys.executable).with_name("loraplex")
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/12"
BUCKET = "loraplex"


@dataclass
class Proc(Process):
    """One fleet process, and where it listens (empty for a worker)."""

    url: str = ""
    base: str = ""
    """The served name of the base an engine or a worker is for (empty for a gateway)."""


@dataclass
class FleetConfig:
    home: Path
    """Where logs, SeaweedFS data, adapter caches and the engine list go (wiped at start)."""
    bases: list[Path]
    """The base model directories; each is served by its own engines and worker, under its
    directory's name. The first is the fleet's main base (``Fleet.settings``)."""
    database: str = "loraplex_fleet"
    """PostgreSQL database, dropped and created again at start."""
    pg_admin_url: str = PG_ADMIN_URL
    """Where to create it: a superuser connection to a PostgreSQL server; the fleet's
    database lives on that server."""
    redis_url: str = REDIS_URL
    """The Redis database the gateways share tenant limits in; emptied at start."""
    engines_per_base: int = 1
    gateways: int = 2
    engine_args: dict[str, object] = field(
        default_factory=lambda: {
            "engine_dtype": "float32",
            "engine_max_model_len": 1024,
            # Smaller than a lone engine's 1 GiB: two engines share the machine.
            "engine_kv_cache_bytes": 256 << 20,
        }
    )
    """Engine settings; small KV caches so two CPU engines fit beside everything else."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """More settings for every loraplex process (a test allowing loopback webhooks, say)."""


class Fleet:
    """Start, inspect and stop the loopback fleet."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        home = config.home
        self.database_url = _database_url(config.pg_admin_url, config.database)
        self.s3 = SeaweedFS(home / "s3", BUCKET, secrets.token_hex(8), secrets.token_urlsafe(24))
        self.settings = Settings(
            home=home,
            base_model=config.bases[0],
            database_url=self.database_url,
            blob_url=f"s3://{BUCKET}/blobs",
            s3_endpoint_url=self.s3.endpoint,
            engine_api_key=secrets.token_urlsafe(32),
            redis_url=config.redis_url,
            **config.engine_args,  # type: ignore[arg-type]
        )
        self.base_settings = [
            dataclasses.replace(self.settings, base_model=path) for path in config.bases
        ]
        """The settings of each base's engines and worker: the fleet's, with its base."""
        self.engine_list = home / "engines.txt"
        self.engines: list[Proc] = []
        self.gateways: list[Proc] = []
        self.workers: list[Proc] = []
        self.base_fingerprints: dict[str, str] = {}
        """Served name -> registry fingerprint of each base."""

    @property
    def base_names(self) -> list[str]:
        """The served name of each base, in ``config.bases`` order."""
        return [s.resolved_served_model_name for s in self.base_settings]

    @property
    def worker(self) -> Proc | None:
        """The main base's worker."""
        return self.workers[0] if self.workers else None

    # -- the shared environment -------------------------------------------------

    def env(self) -> dict[str, str]:
        """What every loraplex process reads: database, blob store, S3 credentials, engine key."""
        s = self.settings
        return {
            **os.environ,
            "LORAPLEX_DATABASE_URL": s.resolved_database_url,
            "LORAPLEX_BLOB_URL": s.resolved_blob_url,
            "LORAPLEX_S3_ENDPOINT_URL": s.s3_endpoint_url,
            "LORAPLEX_ENGINE_API_KEY": s.engine_api_key,
            "LORAPLEX_BASE_MODEL": str(s.resolved_base_model),
            "LORAPLEX_REDIS_URL": s.redis_url,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
            **self.config.extra_env,
        }

    def registry(self) -> Registry:
        """The fleet's registry, opened as an operator would, with the fleet's own S3
        credentials (this process's environment has none; close it after use)."""
        url = self.settings.resolved_blob_url
        blobs = open_blob_store(url, self.s3.endpoint, s3_client=self.s3.client())
        return Registry(self.database_url, blobs, auto_migrate=False)

    # -- starting ---------------------------------------------------------------

    def start(self, progress: bool = False) -> Fleet:
        home = self.config.home
        _wipe(home)
        _recreate_database(self.config.pg_admin_url, self.config.database)
        _empty_redis(self.config.redis_url)
        self.s3.start()
        self._migrate()
        self._register_bases()
        per_base = self.config.engines_per_base
        self.engines = [
            self._engine(index, self.base_settings[index // per_base])
            for index in range(per_base * len(self.base_settings))
        ]
        for engine in self.engines:
            engine.start()
        self.write_engine_list([e.url for e in self.engines])
        self.gateways = [self._gateway(i).start() for i in range(self.config.gateways)]
        self.workers = [self._worker(settings).start() for settings in self.base_settings]
        self.wait_ready(progress=progress)
        return self

    def _migrate(self) -> None:
        done = subprocess.run(
            [str(LOADER), "migrate"], env=self.env(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"loraplex migrate failed:\n{done.stdout}{done.stderr}")

    def _register_bases(self) -> None:
        registry = self.registry()
        try:
            for settings in self.base_settings:
                record = registry.register_base(
                    settings.resolved_base_model,
                    settings.resolved_served_model_name,
                    settings.base_revision,
                    OPERATOR,
                )
                self.base_fingerprints[record.name] = record.fingerprint
        finally:
            registry.close()

    def _engine(self, index: int, settings: Settings) -> Proc:
        port = free_port()
        cache = self.config.home / "adapter-cache" / f"engine-{index}"
        cache.mkdir(parents=True, exist_ok=True)
        name = settings.resolved_served_model_name
        resolver = resolver_environment(settings, self.base_fingerprints[name], cache)
        env = {**engine_environment(settings, resolver), **_s3_env(self.env())}
        command = engine_command(settings, port)
        url = f"http://127.0.0.1:{port}"
        return self._proc(f"engine-{index}", command, env, url, base=name)

    def _worker(self, settings: Settings) -> Proc:
        name = settings.resolved_served_model_name
        env = {**self.env(), "LORAPLEX_BASE_MODEL": str(settings.resolved_base_model)}
        index = self.base_names.index(name)
        work = self.config.home / f"worker-{index}"
        command = [str(LOADER), "worker", "--work-dir", str(work)]
        return self._proc("worker" if index == 0 else f"worker-{index}", command, env, base=name)

    def _gateway(self, index: int) -> Proc:
        port = free_port()
        command = [
            str(LOADER),
            "serve",
            "--home",
            str(self.config.home / f"gateway-{index}"),
            "--port",
            str(port),
            "--engine-discovery",
            f"file://{self.engine_list}",
        ]
        return self._proc(f"gateway-{index}", command, self.env(), f"http://127.0.0.1:{port}")

    def _proc(
        self, name: str, command: list[str], env: dict[str, str], url: str = "", base: str = ""
    ) -> Proc:
        log_path = self.config.home / "logs" / f"{name}.log"
        # Nothing outlives the fleet: not even a `make fleet` killed without a chance to stop it.
        return Proc(name, command, log_path, env, dies_with_parent=True, url=url, base=base)

    def write_engine_list(self, urls: list[str]) -> None:
        """What the gateways' discovery reads; written atomically (rename)."""
        tmp = self.engine_list.with_suffix(".tmp")
        tmp.write_text("".join(f"{url}\n" for url in urls))
        tmp.replace(self.engine_list)

    def wait_ready(self, timeout: float = 900, progress: bool = False) -> None:
        """Until every gateway reports every engine healthy; raises with the logs if not."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.check_alive()
            healthy = [self.healthy_engines(g) for g in self.gateways]
            if all(h == len(self.engines) for h in healthy):
                return
            if progress:
                elapsed = time.monotonic() - started
                print(
                    f"\r    waiting for {len(self.engines)} vLLM engines to load the model... "
                    f"{elapsed:.0f} s (healthy as seen by each gateway: {healthy})",
                    end="",
                    flush=True,
                )
            time.sleep(1)
        raise RuntimeError(f"fleet not ready after {timeout:.0f} s\n{self.logs()}")

    def healthy_engines(self, gateway: Proc) -> int:
        try:
            ready = httpx.get(gateway.url + "/readyz", timeout=2)
            return int(ready.json()["engines_healthy"])
        except (httpx.HTTPError, ValueError, KeyError):
            return -1

    def check_alive(self) -> None:
        """Raise ProcessExited, with its log's tail, for the first part that has exited."""
        for proc in [*self.engines, *self.gateways, *self.workers]:
            proc.check_running()

    def create_tenant(self, name: str) -> str:
        """A new tenant and an API key for it (the plaintext key)."""
        registry = self.registry()
        try:
            tenant = registry.create_tenant(name, OPERATOR)
            _, key = registry.create_api_key(tenant.id, TENANT_SCOPE, OPERATOR)
        finally:
            registry.close()
        return key

    # -- looking and stopping -----------------------------------------------------

    def where(self) -> list[tuple[str, str]]:
        """(process, address) for every part, as ``make fleet`` prints them."""
        rows = [(g.name, g.url) for g in self.gateways]
        rows += [
            (e.name, f"{e.url}  base {e.base} (loopback only; key-protected)") for e in self.engines
        ]
        rows += [(w.name, f"base {w.base}; no port; log {w.log_path}") for w in self.workers]
        rows.append(("postgresql", self.database_url))
        rows.append(("redis", f"{self.config.redis_url}  (tenant limits, shared by the gateways)"))
        rows.append(("seaweedfs s3", f"{self.s3.endpoint}  bucket {BUCKET}"))
        rows.append(("engine list", f"{self.engine_list}  (read by the gateways every 5 s)"))
        return rows

    def logs(self) -> str:
        procs = [*self.gateways, *self.engines, *self.workers]
        return "\n".join(f"--- {p.name} ({p.log_path})\n{p.tail()}" for p in procs)

    def stop(self) -> None:
        procs = [*self.gateways, *self.workers, *self.engines]
        for proc in procs:
            proc.terminate()  # all at once: stopping one after another would add up the waits
        for proc in procs:
            proc.stop()
        self.s3.stop()


def _database_url(admin_url: str, database: str) -> str:
    """``database`` on the server ``admin_url`` connects to, as the same user."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _empty_redis(url: str) -> None:
    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        raise RuntimeError(
            f"cannot reach Redis at {url} ({exc}); start it, or pass --redis-url"
        ) from None


def _s3_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("AWS_")}


def _wipe(home: Path) -> None:
    import shutil

    shutil.rmtree(home, ignore_errors=True)
    (home / "logs").mkdir(parents=True)


def _recreate_database(admin_url: str, name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"cannot reach PostgreSQL at {admin_url} ({exc}); start it, or pass "
            "--pg-admin-url with a superuser connection"
        ) from None


# -- make fleet ---------------------------------------------------------------------


def _try_it(fleet: Fleet) -> str:
    """A tenant key and the commands to try the fleet with."""
    key = fleet.create_tenant("fleet-demo")
    gateway = fleet.gateways[0].url
    models = " or ".join(repr(name) for name in fleet.base_names)
    model = fleet.base_names[0]
    return (
        f"Tenant 'fleet-demo', API key: {key}\n"
        f"  curl {gateway}/v1/chat/completions -H 'authorization: Bearer {key}' \\\n"
        f"    -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'\n'
        f"  (model: {models}; both gateways serve both bases)\n"
        f'  OPENAI_BASE_URL={gateway}/v1 OPENAI_API_KEY={key} python -c "import openai; '
        f'print(openai.OpenAI().models.list())"'
    )


def build_bases(main: str | None, progress: bool = True) -> list[Path]:
    """The fleet's two bases: ``main`` (default: the demo base) and the small demo base."""
    from training.demo_base import build_demo_base

    cache = Path(".loraplex")
    first = Path(main) if main else build_demo_base(cache / "demo-base", progress=progress)
    second = build_demo_base(cache / "demo-base-small", SMALL_BASE, progress=progress)
    return [first.resolve(), second.resolve()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make fleet", description="The production topology on loopback; Ctrl-C stops it."
    )
    parser.add_argument("--home", default=".loraplex/fleet", help="state and logs (wiped)")
    main_help = "the main base (default: the demo base); the small demo base is the second"
    parser.add_argument("--base-model", help=main_help)
    parser.add_argument("--engines-per-base", type=int, default=1)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--redis-url", default=REDIS_URL, help="a database the fleet empties")
    args = parser.parse_args(argv)

    config = FleetConfig(
        Path(args.home).resolve(),
        build_bases(args.base_model),
        pg_admin_url=args.pg_admin_url,
        redis_url=args.redis_url,
        engines_per_base=args.engines_per_base,
        gateways=args.gateways,
    )
    fleet = Fleet(config)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"==> starting the fleet under {config.home} (logs in {config.home / 'logs'})")
        fleet.start(progress=True)
        print("\n==> the fleet is up; each process listens at:")
        for name, where in fleet.where():
            print(f"    {name:14} {where}")
        print("==> try it:\n    " + _try_it(fleet).replace("\n", "\n    "))
        print("==> Ctrl-C stops everything.", flush=True)
        while True:
            fleet.check_alive()
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"\nmake fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second signal (an impatient Ctrl-C, a supervisor repeating SIGTERM) must not
        # cut the shutdown short and leave engines behind; stop() is bounded anyway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\n==> stopping the fleet", flush=True)
        fleet.stop()
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the fleet the way Ctrl-C does, at any point


if __name__ == "__main__":
    raise SystemExit(main())
