"""``make chaos``: the ``make fleet`` topology under mixed traffic while its processes die.

The fleet (gateways, engines, the fine-tuning worker, SeaweedFS as S3) runs on
a PostgreSQL cluster and a Redis of its own (``server.dev.postgres``,
``server.dev.redis_server``): they are killed and restarted here, and the
machine's shared ones must never be. Several tenants send inference, upload
adapters, move aliases and fine-tune (``server.dev.chaos_workload``) while the
main thread, every few seconds, kills a random process (a gateway, an engine,
the worker, Redis) or restarts PostgreSQL or SeaweedFS, and starts it again as
an orchestrator would. At most one process of each kind is down at a time
(two gateways: one keeps answering).

After the kills it waits for the fleet to be whole again, reads back the
registry and checks (``server.dev.chaos_checks``): no answer from another
tenant's adapter or from a version no alias pointed at; no acknowledged write
lost, no half-registered version, every job ended or running cleanly; every
failed request failed cleanly, retryably and within its timeout; the fleet
healthy within 60 s of the last kill. It prints a table, writes the figures to
``bench/results/chaos.json`` (or ``--out``) and exits 1 if a check failed.

Every process is started from the main thread: the fleet's processes die with
the thread that started them (``Process.dies_with_parent``).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from registry import TenantLimits
from server.dev import chaos_checks as checks
from server.dev.chaos_checks import Call, Fault, Verdict
from server.dev.chaos_workload import (
    OWN_NAME,
    REGISTRY_TIMEOUT,
    SHARED_NAME,
    AdapterPool,
    Gateway,
    SoakAdapter,
    SoakTenant,
    Workload,
    tuned_name,
)
from server.dev.fleet import OPERATOR, Fleet, FleetConfig
from server.dev.postgres import PostgresCluster
from server.dev.process import Process
from server.dev.redis_server import RedisServer

HEALTH_DEADLINE = 60.0
"""Seconds after the last kill by which the whole fleet must be healthy again."""
RECOVERY_WAIT = 600.0
"""How long to keep waiting past the deadline, to measure how late it was."""
JOB_WAIT = 180.0
"""Seconds to let fine-tuning jobs finish once the fleet is whole, before reading them."""
STALE_AFTER = 15.0
"""The worker re-queues a killed worker's job after this many seconds without heartbeat."""
TENANTS = ("tenant-a", "tenant-b", "tenant-c")
LIMITS = TenantLimits(requests_per_minute=100_000, tokens_per_minute=10_000_000, max_concurrent=64)
"""Never reached, but set: every request is counted in the shared Redis."""
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ChaosConfig:
    minutes: float
    seed: int
    home: Path
    """Wiped at start: the fleet, its PostgreSQL cluster, Redis, adapters, logs."""
    bases: list[Path]
    out: Path
    kill_every: tuple[float, float] = (3.0, 8.0)
    """Seconds between two kills, drawn uniformly."""
    inference_threads: int = 4
    job_every: float = 40.0
    engines_per_base: int = 1


@dataclass
class Target:
    """A process the killer may take down, and how to bring it back."""

    name: str
    role: str
    """At most one process of a role is down at a time."""
    action: str
    down: Callable[[], object]
    up: Callable[[], object]
    ready: Callable[[], bool]
    alive: Callable[[], bool]
    delay: tuple[float, float]
    """Seconds it stays down before it is started again."""


@dataclass
class Killer:
    """Kills and restarts, all from the calling (main) thread; every fault recorded."""

    targets: list[Target]
    rng: random.Random
    kill_every: tuple[float, float]
    faults: list[Fault] = field(default_factory=list)
    failed_starts: list[str] = field(default_factory=list)
    """Processes that exited while coming back (started while what they need was down)."""
    crashes: list[str] = field(default_factory=list)
    """Processes that died although nobody killed them."""
    _due: dict[str, float] = field(default_factory=dict)
    """Target -> when to start it again."""
    _round: list[str] = field(default_factory=list)
    """Kinds of process still to take down in this round."""

    def open_fault(self, target: Target) -> Fault | None:
        return next((f for f in self.faults if f.target == target.name and not f.ready), None)

    def run(self, seconds: float) -> None:
        until = time.time() + seconds
        next_kill = time.time() + self.rng.uniform(*self.kill_every)
        while time.time() < until:
            self.tick()
            if time.time() >= next_kill:
                self.kill_one()
                next_kill = time.time() + self.rng.uniform(*self.kill_every)
            time.sleep(0.2)

    def kill_one(self) -> None:
        """Kill a random process of the next kind in this round whose kind is all up.

        Rounds visit every kind once, in a fresh random order: a short soak still
        takes down each kind, yet nothing follows a fixed pattern. A kind still down
        when its turn comes (an engine takes minutes to load on 2 cores) waits for a
        later round instead of holding up the kills.
        """
        down = {t.role for t in self.targets if self.open_fault(t)}
        role = next((r for r in self._round if r not in down), None)
        if role is None:  # the round is over, or what is left of it is still down
            self._round = sorted({t.role for t in self.targets})
            self.rng.shuffle(self._round)
            role = next((r for r in self._round if r not in down), None)
        if role is None:
            return
        self._round.remove(role)
        target = self.rng.choice([t for t in self.targets if t.role == role])
        fault = Fault(target.name, target.action, time.time())
        print(f"    {time.strftime('%H:%M:%S')}  {target.action} {target.name}", flush=True)
        target.down()
        self.faults.append(fault)
        self._due[target.name] = time.time() + self.rng.uniform(*target.delay)

    def tick(self) -> None:
        """Start what is due, note what is ready, and restart what died by itself."""
        for target in self.targets:
            fault = self.open_fault(target)
            if fault is not None:
                self._advance(target, fault)
            elif not target.alive():
                now = time.time()
                print(f"    {time.strftime('%H:%M:%S')}  {target.name} died by itself", flush=True)
                self.crashes.append(f"{target.name} at {now:.1f}")
                self.faults.append(Fault(target.name, "crash", now))
                self._due[target.name] = now

    def _advance(self, target: Target, fault: Fault) -> None:
        if fault.started and target.alive():
            if _probe(target.ready):
                fault.ready = time.time()
            return
        if time.time() < self._due[target.name]:
            return
        if fault.started:  # it exited while coming back: what it needs may still be down
            self.failed_starts.append(f"{target.name} at {time.time():.1f}")
        try:
            target.up()
        except Exception as exc:  # a service that did not come up; try again shortly
            self.failed_starts.append(f"{target.name}: {type(exc).__name__}")
            self._due[target.name] = time.time() + 1.0
            return
        fault.started = time.time()
        self._due[target.name] = fault.started + 1.0

    def settle(self, healthy: Callable[[], bool], deadline: float) -> float | None:
        """Keep restarting until nothing is down and ``healthy()``; when, or None."""
        while time.time() < deadline:
            self.tick()
            if not any(self.open_fault(t) for t in self.targets) and _probe(healthy):
                return time.time()
            time.sleep(0.5)
        return None


def _probe(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except Exception:  # a probe of a process that is down: not ready, whatever it raises
        return False


def _alive(proc: Process) -> bool:
    return proc.alive


def _answers(url: str, headers: dict[str, str] | None = None) -> bool:
    return httpx.get(url, headers=headers, timeout=2).status_code == 200


# -- the fleet and its targets ----------------------------------------------------------


@dataclass
class ChaosFleet:
    config: ChaosConfig
    pg: PostgresCluster
    redis: RedisServer
    fleet: Fleet

    @classmethod
    def create(cls, config: ChaosConfig) -> ChaosFleet:
        import shutil

        shutil.rmtree(config.home, ignore_errors=True)
        # Traversable by all: as root, PostgreSQL runs as the postgres user inside it.
        config.home.mkdir(parents=True)
        config.home.chmod(0o755)
        pg = PostgresCluster(config.home / "postgres")
        redis = RedisServer(config.home / "redis")
        fleet = Fleet(fleet_config(config, pg, redis))
        return cls(config, pg, redis, fleet)

    def start(self) -> None:
        self.pg.start()
        self.redis.start()
        self.fleet.start(progress=True)
        print()
        reaping_workers(self.fleet)

    def stop(self) -> None:
        self.fleet.stop()
        self.redis.kill()
        self.pg.kill()

    def targets(self) -> list[Target]:
        """Every process of the fleet and the services it needs, as the killer sees them."""
        fleet, found = self.fleet, []
        for proc, role in [
            *((g, "gateway") for g in fleet.gateways),
            *((e, "engine") for e in fleet.engines),
        ]:
            # A gateway is ready when Kubernetes would route to it again (its readinessProbe).
            probe = proc.url + ("/readyz" if role == "gateway" else "/health")
            found.append(
                Target(
                    proc.name,
                    role,
                    "kill",
                    down=proc.kill,
                    up=proc.start,
                    ready=functools.partial(_answers, probe),
                    alive=functools.partial(_alive, proc),
                    # An engine's restart takes a minute anyway; a gateway's a second or two.
                    delay=(0.5, 2.0) if role == "gateway" else (0.0, 0.0),
                )
            )
        s3 = fleet.s3
        services: list[
            tuple[str, str, Callable[[], object], Callable[[], object], Callable[[], bool]]
        ] = [(w.name, "kill", w.kill, w.start, functools.partial(_alive, w)) for w in fleet.workers]
        services += [
            ("redis", "kill", self.redis.kill, self.redis.start, lambda: self.redis.alive),
            ("postgresql", "restart", self.pg.stop, self.pg.start, lambda: self.pg.alive),
            ("s3", "restart", s3.stop, s3.start, lambda: bool(s3.runner and s3.runner.alive)),
        ]
        for name, action, down, up, alive in services:
            # Each start waits until the service answers (the worker: until it runs).
            role = name.split("-")[0]
            found.append(Target(name, role, action, down, up, alive, alive, (1.0, 3.0)))
        return found

    def whole_gateway(self) -> Gateway:
        """A gateway that sees every engine healthy (the first, if none does)."""
        engines = len(self.fleet.engines)
        whole = [g for g in self.fleet.gateways if self.fleet.healthy_engines(g) == engines]
        chosen = (whole or self.fleet.gateways)[0]
        return Gateway(chosen.name, chosen.url)

    def healthy(self) -> bool:
        """Every process up, and every gateway sees every engine healthy."""
        self.fleet.check_alive()
        s3 = self.fleet.s3.runner
        if not (self.redis.alive and self.pg.alive and s3 and s3.alive):
            return False
        engines = len(self.fleet.engines)
        return all(self.fleet.healthy_engines(g) == engines for g in self.fleet.gateways)


def fleet_config(config: ChaosConfig, pg: PostgresCluster, redis: RedisServer) -> FleetConfig:
    """The ``make fleet`` topology on the soak's own PostgreSQL and Redis."""
    return FleetConfig(
        config.home / "fleet",
        config.bases,
        database="loraplex_chaos",
        pg_admin_url=pg.admin_url,
        redis_url=redis.url,
        engines_per_base=config.engines_per_base,
    )


def reaping_workers(fleet: Fleet) -> None:
    """Restart the fleet's workers so a killed worker's job is re-queued within the soak.

    The default (120 s without a heartbeat) outlasts a short soak; 15 s with a
    heartbeat a second is what this run can wait for.
    """
    for worker in fleet.workers:
        worker.kill()
        stale = str(STALE_AFTER)
        worker.command = [*worker.command, "--heartbeat-interval", "1", "--stale-after", stale]
        worker.start()


# -- before the kills: tenants, adapters, first versions -----------------------------------


def populate(soak: ChaosFleet, workload: Workload) -> None:
    """Tenants with generous limits; each adapter with two versions, one in production."""
    registry = soak.fleet.registry()
    try:
        for tenant in workload.tenants:
            registry.set_tenant_limits(tenant.name, LIMITS, OPERATOR)
    finally:
        registry.close()
    rng = random.Random(soak.config.seed)
    for tenant in workload.tenants:
        for adapter in tenant.adapters.values():
            if adapter.tuned:
                continue
            for _ in range(2):
                workload.upload(rng, tenant, adapter)
            workload.move(rng, tenant, adapter, "promote")
    refused = [c for c in workload.calls if not c.acknowledged]
    if refused:
        raise RuntimeError(f"setting up the adapters failed before any kill: {refused[:3]}")


def make_tenants(soak: ChaosFleet, bases: list[str]) -> list[SoakTenant]:
    tenants = []
    for name in TENANTS:
        tenant = SoakTenant(name, soak.fleet.create_tenant(name))
        tenant.adapters[SHARED_NAME] = SoakAdapter(name, SHARED_NAME, bases[0])
        if len(bases) > 1:
            tenant.adapters[OWN_NAME] = SoakAdapter(name, OWN_NAME, bases[1])
        for index, base in enumerate(bases):
            tuned = tuned_name(index)
            tenant.adapters[tuned] = SoakAdapter(name, tuned, base, tuned=True)
        tenants.append(tenant)
    return tenants


# -- after the kills: what the registry holds, what each model says -------------------------


def observe(fleet: Fleet, tenants: list[SoakTenant]) -> checks.Observed:
    """The registry's alias history, versions, jobs and files, read back directly."""
    from registry.jobs import JobStore

    registry = fleet.registry()
    store = JobStore(registry, stale_after=STALE_AFTER)
    observed = checks.Observed([], {}, [], {}, set(), STALE_AFTER)
    try:
        for event in registry.audit_log(limit=10_000_000):
            if event.after and "aliases" in event.after:
                at = event.created_at.timestamp()
                observed.alias_events.append(
                    checks.AliasEvent(event.subject, event.action, at, event.after["aliases"])
                )
        for tenant in tenants:
            tenant_id = registry.get_tenant(tenant.name).id
            assert tenant_id is not None
            _observe_tenant(registry, store, tenant.name, tenant_id, observed)
    finally:
        registry.close()
    return observed


def _observe_tenant(
    registry: Any, store: Any, tenant: str, tenant_id: int, observed: checks.Observed
) -> None:
    for adapter in registry.list_adapters(tenant_id):
        name = checks.subject(tenant, adapter.name)
        observed.current_aliases[name] = {
            alias: {"version": target.version, "weight": target.weight}
            for alias, target in registry.aliases(tenant_id, adapter.name).items()
        }
        for v in registry.list_versions(tenant_id, adapter.name):
            evals = registry.eval_results(tenant_id, adapter.name, v.number)
            observed.versions.append(
                checks.StoredVersion(
                    tenant,
                    adapter.name,
                    v.number,
                    v.fingerprint,
                    registry.blobs.exists(v.blob_key),
                    v.training_job,
                    bool(evals),
                )
            )
    now = time.time()
    for job in store.list_jobs(tenant_id, limit=100_000):
        beat = job.heartbeat_at.timestamp() if job.heartbeat_at else None
        message = str((job.error or {}).get("message") or "")
        observed.jobs[job.id] = checks.JobState(
            tenant,
            job.id,
            job.status,
            job.fine_tuned_model,
            message,
            None if beat is None else now - beat,
        )
    observed.files |= {f.id for f in store.list_files(tenant_id)}


def expected_texts(
    gateway: Gateway, tenants: list[SoakTenant], observed: checks.Observed, bases: list[str]
) -> dict[tuple[str, str], str]:
    """What every base and version answers when asked alone, by pinned name, on a whole fleet."""
    from openai import OpenAI

    from server.dev.chaos_workload import infer

    keys = {t.name: t.key for t in tenants}
    models = [(tenants[0].name, base, base) for base in bases]
    models += [
        (v.tenant, f"{v.adapter}@{v.number}", f"{v.tenant}/{v.adapter}@{v.number}")
        for v in observed.versions
    ]
    texts: dict[tuple[str, str], str] = {}
    for tenant, model, key in models:
        client = OpenAI(base_url=gateway.url + "/v1", api_key=keys[tenant], max_retries=2)
        for kind in ("chat", "completion"):
            call = Call(kind, tenant, model, gateway.name, time.time(), REGISTRY_TIMEOUT)
            infer(client, call, "expected")
            if call.acknowledged:
                texts[(kind, key)] = call.text
    return texts


def save_records(path: Path, calls: list[Call], faults: list[Fault]) -> None:
    """Every request and fault as recorded, for looking into a failed check."""
    records = {"calls": [asdict(c) for c in calls], "faults": [asdict(f) for f in faults]}
    path.write_text(json.dumps(records, indent=1) + "\n")


def wait_for_jobs(fleet: Fleet, killer: Killer, job_ids: list[str], timeout: float) -> None:
    """Until every acknowledged job has ended, is queued or runs under a live heartbeat."""
    from registry.jobs import JobStore

    deadline = time.time() + timeout
    registry = fleet.registry()
    try:
        store = JobStore(registry, stale_after=STALE_AFTER)
        while time.time() < deadline:
            killer.tick()
            jobs = [store.get_job(None, job_id) for job_id in job_ids]
            if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs):
                return
            time.sleep(2)
    finally:
        registry.close()


# -- the run and its figures --------------------------------------------------------------


@dataclass
class Run:
    """Everything one soak recorded, for the checks and the report."""

    config: ChaosConfig
    startup_s: float
    calls: list[Call]
    faults: list[Fault]
    killer: Killer
    last_kill: float
    healthy_at: float | None
    observed: checks.Observed
    expected: dict[tuple[str, str], str]


def soak(config: ChaosConfig) -> Run:
    """Start the fleet, load it, kill for ``config.minutes``, let it heal, read it back."""
    rig = ChaosFleet.create(config)
    try:
        started = time.time()
        print(f"==> starting the fleet under {config.home} (logs in {config.home}/fleet/logs)")
        rig.start()
        startup = time.time() - started
        bases = [b.name for b in config.bases]
        tenants = make_tenants(rig, bases)
        gateways = [Gateway(g.name, g.url) for g in rig.fleet.gateways]
        pool = AdapterPool(config.home / "adapters", config.seed)
        workload = Workload(gateways, tenants, {b.name: b for b in config.bases}, pool, config.seed)
        print("==> uploading and promoting the first adapter versions")
        populate(rig, workload)
        killer = Killer(rig.targets(), random.Random(config.seed), config.kill_every)
        print(
            f"==> traffic on, a process killed every {config.kill_every} s for {config.minutes} min"
        )
        workload.start(config.inference_threads, config.job_every)
        try:
            killer.run(config.minutes * 60)
        finally:
            # Traffic ends with the kills: on a 2-core machine it would starve restarting engines.
            workload.finish()
        save_records(config.home / "records.json", workload.calls, killer.faults)
        last_kill = max((f.at for f in killer.faults), default=time.time())
        print("==> kills over; waiting for the fleet to be whole again")
        healthy_at = killer.settle(rig.healthy, last_kill + HEALTH_DEADLINE + RECOVERY_WAIT)
        wait_for_jobs(rig.fleet, killer, list(workload.jobs), JOB_WAIT)
        print("==> reading back the registry and what every version answers")
        observed = observe(rig.fleet, tenants)
        expected = expected_texts(rig.whole_gateway(), tenants, observed, bases)
        texts = [{"kind": kind, "model": model, "text": t} for (kind, model), t in expected.items()]
        (config.home / "expected.json").write_text(json.dumps(texts, indent=1) + "\n")
        return Run(
            config, startup, workload.calls, killer.faults, killer, last_kill, healthy_at,
            observed, expected,
        )  # fmt: skip
    finally:
        rig.stop()


def verdicts(run: Run) -> list[Verdict]:
    recovery = (run.healthy_at - run.last_kill) if run.healthy_at else None
    late = Verdict(
        f"fleet back to full health within {HEALTH_DEADLINE:.0f} s of the last kill",
        1,
        "recovery",
        0,
        f"late ({'never' if recovery is None else f'{recovery:.0f} s'})",
    )
    if recovery is None or recovery > HEALTH_DEADLINE:
        late.add(late.bad_means)
    crashed = Verdict(
        "processes that died with nobody killing them",
        len(run.killer.targets),
        "processes",
        0,
        "crashes",
    )
    for crash in run.killer.crashes:
        crashed.add(crash)
    tuned = {f"{v.tenant}/{v.adapter}@{v.number}" for v in run.observed.versions if v.training_job}
    return [
        checks.check_isolation(run.calls, run.expected, weak=tuned),
        checks.check_aliases(run.calls, run.observed.alias_events),
        checks.check_writes(run.calls, run.observed),
        checks.check_versions(run.observed),
        checks.check_jobs(run.calls, run.observed),
        checks.check_failures(run.calls, run.faults),
        late,
        crashed,
    ]


def _downtime(faults: list[Fault]) -> dict[str, dict[str, Any]]:
    """Per kind of process: how many faults, the median and longest seconds until it was
    ready again, and how many were not ready when the kills ended."""
    spans: dict[str, list[float]] = {}
    pending: dict[str, int] = {}
    for f in faults:
        role = f.target.split("-")[0]
        spans.setdefault(role, [])
        if f.ready:
            spans[role].append(f.ready - f.at)
        else:
            pending[role] = pending.get(role, 0) + 1
    return {
        role: {
            "faults": len(values) + pending.get(role, 0),
            "median_down_s": round(statistics.median(values), 1) if values else None,
            "max_down_s": round(max(values), 1) if values else None,
            "not_ready_by_the_end": pending.get(role, 0),
        }
        for role, values in sorted(spans.items())
    }


def summary(run: Run, found: list[Verdict]) -> dict[str, Any]:
    """The figures ``bench/results/chaos.json`` keeps."""
    outcomes: dict[str, int] = {}
    for call in run.calls:
        kind = checks.outcome(call, run.faults)
        outcomes[kind] = outcomes.get(kind, 0) + 1
    ops: dict[str, int] = {}
    for call in run.calls:
        ops[call.op] = ops.get(call.op, 0) + 1
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    recovery = run.healthy_at - run.last_kill if run.healthy_at else None
    config = run.config
    return {
        "command": f"python -m server.dev.chaos --minutes {config.minutes} --seed {config.seed}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "cores": _cores(),
        "minutes": config.minutes,
        "seed": config.seed,
        "kill_every_s": list(config.kill_every),
        "bases": [b.name for b in config.bases],
        "startup_s": round(run.startup_s, 1),
        "requests": ops,
        "outcomes": outcomes,
        "faults": _downtime(run.faults),
        "recovery_s": None if recovery is None else round(recovery, 1),
        "failed_starts": run.killer.failed_starts,
        "unidentified_texts": checks.unidentified(run.calls, run.expected),
        "checks": [asdict(v) for v in found],
        "passed": all(v.bad == 0 for v in found),
    }


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def table(found: list[Verdict]) -> str:
    lines = [f"{'check':76} {'tried':>26}  bad", "-" * 110]
    for v in found:
        tried = f"{v.tried:,} {v.unit}"
        lines.append(f"{v.check:76} {tried:>26}  {v.bad} {v.bad_means}")
        lines += [f"    e.g. {example}" for example in v.examples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make chaos", description="Kill fleet processes under traffic, then check the damage."
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the kills go on")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--home", default=".loraplex/chaos", help="state and logs (wiped)")
    parser.add_argument(
        "--base-model", action="append", help="a base directory (repeat for several; "
        "default: the demo base and a second demo base)"
    )  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "chaos.json"))
    args = parser.parse_args(argv)
    config = ChaosConfig(
        args.minutes, args.seed, Path(args.home).resolve(), default_bases(args.base_model),
        Path(args.out),
    )  # fmt: skip
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        run = soak(config)
    except KeyboardInterrupt:
        return 130
    found = verdicts(run)
    figures = summary(run, found)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(table(found))
    print(
        f"requests: {figures['requests']}; outcomes: {figures['outcomes']}; "
        f"recovery after the last kill: {figures['recovery_s']} s; figures in {config.out}"
    )
    return 0 if figures["passed"] else 1


def _interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM stops the soak as Ctrl-C does; a second signal must not cut the fleet's
    shutdown short and leave engines behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def default_bases(given: list[str] | None) -> list[Path]:
    """The bases given, or ``make fleet``'s two (the demo base and the small one)."""
    if given:
        return [Path(b).resolve() for b in given]
    from server.dev.fleet import SMALL_BASE
    from training.demo_base import build_demo_base

    cache = REPO / ".loraplex"
    return [
        build_demo_base(cache / "demo-base"),
        build_demo_base(cache / "demo-base-small", SMALL_BASE),
    ]


if __name__ == "__main__":
    sys.exit(main())
