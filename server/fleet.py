"""``make fleet``: the production topology as real processes on one machine's loopback.

Two gateways, two vLLM engines, one fine-tuning worker, PostgreSQL (the
machine's server; a fresh database) and SeaweedFS as the S3 blob store: the
same processes, commands and settings as the Kubernetes manifests in
``deploy/k8s``, only addressed on 127.0.0.1. As there:

- the registry schema is migrated once by ``loraplex migrate`` (the Job);
- engines run vLLM directly with the resolver plugin configured by environment,
  each with its own adapter cache, and fetch adapters from S3 by content;
- gateways find engines through ``--engine-discovery`` (a file here, a headless
  Service's DNS name there), hold no state of their own and can be killed at will;
- nothing restarts a killed process by itself: that is the orchestrator's job,
  done here by calling ``start()`` again.

``tests/e2e/test_fleet.py`` drives this class; ``python -m server.fleet`` (what
``make fleet`` runs) starts it, prints where everything listens and how to
try it, and stops it all on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from registry import TENANT_SCOPE, Actor, Registry, open_blob_store
from server.config import Settings
from server.engine import engine_command, engine_environment, resolver_environment
from server.seaweed import SeaweedFS, die_with_parent

OPERATOR = Actor("fleet:operator", admin=True)
LOADER = Path(sys.executable).with_name("loraplex")
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BUCKET = "loraplex"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One fleet process: started in its own process group, logging to a file."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # so stop() reaches vLLM's own child processes
                preexec_fn=die_with_parent,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group, as a crashed node or an OOM kill would."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, as an orchestrator stops a pod; SIGKILL after ``timeout``."""
        self._signal(signal.SIGTERM)
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._signal(signal.SIGKILL)  # children the main process left behind

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class FleetConfig:
    home: Path
    """Where logs, SeaweedFS data, adapter caches and the engine list go (wiped at start)."""
    base: Path
    """The base model directory every engine, gateway and the worker serve."""
    database: str = "loraplex_fleet"
    """PostgreSQL database, dropped and created again at start."""
    pg_admin_url: str = PG_ADMIN_URL
    """Where to create it: a superuser connection to the machine's PostgreSQL."""
    engines: int = 2
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


class Fleet:
    """Start, inspect and stop the loopback fleet."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        home = config.home
        self.database_url = f"postgresql://postgres@127.0.0.1:5432/{config.database}"
        self.s3 = SeaweedFS(home / "s3", BUCKET, secrets.token_hex(8), secrets.token_urlsafe(24))
        self.settings = Settings(
            home=home,
            base_model=config.base,
            database_url=self.database_url,
            blob_url=f"s3://{BUCKET}/blobs",
            s3_endpoint_url=self.s3.endpoint,
            engine_api_key=secrets.token_urlsafe(32),
            **config.engine_args,  # type: ignore[arg-type]
        )
        self.engine_list = home / "engines.txt"
        self.engines: list[Proc] = []
        self.gateways: list[Proc] = []
        self.worker: Proc | None = None
        self.base_fingerprint = ""

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
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
        }

    def registry(self) -> Registry:
        """The fleet's registry, opened as an operator would (close it after use)."""
        blobs = open_blob_store(self.settings.resolved_blob_url, self.s3.endpoint)
        return Registry(self.database_url, blobs, auto_migrate=False)

    # -- starting ---------------------------------------------------------------

    def start(self, progress: bool = False) -> Fleet:
        home = self.config.home
        _wipe(home)
        _recreate_database(self.config.pg_admin_url, self.config.database)
        self.s3.start()
        self._migrate()
        self._register_base()
        self.engines = [self._engine(i) for i in range(self.config.engines)]
        for engine in self.engines:
            engine.start()
        self.write_engine_list([e.url for e in self.engines])
        self.gateways = [self._gateway(i).start() for i in range(self.config.gateways)]
        self.worker = Proc(
            "worker", [str(LOADER), "worker"], self.env(), home / "logs" / "worker.log"
        )
        self.worker.start()
        self.wait_ready(progress=progress)
        return self

    def _migrate(self) -> None:
        done = subprocess.run(
            [str(LOADER), "migrate"], env=self.env(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"loraplex migrate failed:\n{done.stdout}{done.stderr}")

    def _register_base(self) -> None:
        registry = self.registry()
        try:
            record = registry.register_base(
                self.settings.resolved_base_model,
                self.settings.resolved_served_model_name,
                self.settings.base_revision,
                OPERATOR,
            )
        finally:
            registry.close()
        self.base_fingerprint = record.fingerprint

    def _engine(self, index: int) -> Proc:
        port = free_port()
        cache = self.config.home / "adapter-cache" / f"engine-{index}"
        cache.mkdir(parents=True, exist_ok=True)
        resolver = resolver_environment(self.settings, self.base_fingerprint, cache)
        env = {**engine_environment(self.settings, resolver), **_s3_env(self.env())}
        return Proc(
            f"engine-{index}",
            engine_command(self.settings, port),
            env,
            self.config.home / "logs" / f"engine-{index}.log",
            url=f"http://127.0.0.1:{port}",
        )

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
        return Proc(
            f"gateway-{index}",
            command,
            self.env(),
            self.config.home / "logs" / f"gateway-{index}.log",
            url=f"http://127.0.0.1:{port}",
        )

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
        for proc in [*self.engines, *self.gateways, *([self.worker] if self.worker else [])]:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")

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
        rows += [(e.name, e.url + "  (loopback only; key-protected)") for e in self.engines]
        rows.append(("worker", f"no port; log {self.worker.log_path if self.worker else ''}"))
        rows.append(("postgresql", self.database_url))
        rows.append(("seaweedfs s3", f"{self.s3.endpoint}  bucket {BUCKET}"))
        rows.append(("engine list", f"{self.engine_list}  (read by the gateways every 5 s)"))
        return rows

    def logs(self) -> str:
        procs = [*self.gateways, *self.engines, *([self.worker] if self.worker else [])]
        return "\n".join(f"--- {p.name} ({p.log_path})\n{p.log_tail()}" for p in procs)

    def stop(self) -> None:
        procs = [*self.gateways, *([self.worker] if self.worker else []), *self.engines]
        for proc in procs:
            proc._signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()
        self.s3.stop()


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
    model = fleet.settings.resolved_served_model_name
    return (
        f"Tenant 'fleet-demo', API key: {key}\n"
        f"  curl {gateway}/v1/chat/completions -H 'authorization: Bearer {key}' \\\n"
        f"    -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'\n'
        f'  OPENAI_BASE_URL={gateway}/v1 OPENAI_API_KEY={key} python -c "import openai; '
        f'print(openai.OpenAI().models.list())"'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make fleet", description="The production topology on loopback; Ctrl-C stops it."
    )
    parser.add_argument("--home", default=".loraplex/fleet", help="state and logs (wiped)")
    parser.add_argument("--base-model", help="default: the demo base, built if missing")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    args = parser.parse_args(argv)

    if args.base_model:
        base = Path(args.base_model).resolve()
    else:
        from training.demo_base import build_demo_base

        base = build_demo_base(Path(".loraplex/demo-base")).resolve()
    config = FleetConfig(
        Path(args.home).resolve(),
        base,
        pg_admin_url=args.pg_admin_url,
        engines=args.engines,
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
