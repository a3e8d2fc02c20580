"""A throwaway PostgreSQL cluster of our own, for the chaos soak and fault tests.

The machine's PostgreSQL (127.0.0.1:5432) is shared by every test run at the
same time; a cluster that is killed and restarted on purpose must be private:
``initdb`` into a directory, a free loopback port, trust authentication and
its unix socket in that directory. PostgreSQL refuses to run as root, so when
we are root the cluster is owned by and run as the ``postgres`` user, which
must be able to reach the directory (pytest's ``tmp_path`` is private to root:
use a directory under ``/tmp`` or the repository instead).

``fsync`` is off: the faults here kill processes, never the machine, and a
committed transaction is in the kernel's page cache whatever happens to
PostgreSQL, so nothing acknowledged can be lost; it keeps a shared 2-core CI
host from waiting on the disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from server.dev.local_server import LocalServer

SOCKET_PATH_MAX = 107
"""Longest unix socket path Linux accepts (``sun_path`` less its terminator)."""


def pg_binary(tool: str) -> str:
    """``tool`` from the newest PostgreSQL under /usr/lib/postgresql (Debian's layout)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {tool} not found under /usr/lib/postgresql/*/bin")
    return str(found[-1])


def _as_owner(command: Sequence[str]) -> list[str]:
    """``command`` run as the cluster's owner: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return list(command)


@dataclass
class PostgresCluster(LocalServer):
    """``initdb`` once, then start, stop, restart or kill at will on one port; ``workdir``
    holds ``data/``, the socket and the log."""

    name = "postgres"

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def admin_url(self) -> str:
        """A superuser connection (trust auth), as ``FleetConfig.pg_admin_url`` takes it."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> PostgresCluster:
        """Create the cluster unless ``workdir`` already holds one."""
        socket_path = self.workdir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > SOCKET_PATH_MAX:
            raise RuntimeError(f"{self.workdir} is too deep for a unix socket ({socket_path})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        if (self.data / "PG_VERSION").is_file():
            return self
        initdb = [pg_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        done = subprocess.run(
            _as_owner([*initdb, "--no-sync"]), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"initdb failed in {self.data} (as root, the postgres user must be able to "
                f"reach it):\n{done.stdout}{done.stderr}"
            )
        return self

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        """Start the server (``init`` first if needed) and wait until it takes connections."""
        if not (self.data / "PG_VERSION").is_file():
            self.init()
        self._clear_stale_locks()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.workdir),
            "fsync": "off",
            # Gateways, engines and the worker pool up to 30 connections each.
            "max_connections": "300",
        }
        command = [pg_binary("postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        self.launch(_as_owner(command), self._takes_connections, timeout, interval=0.2)
        return self

    def stop(self, grace: float = 30.0) -> None:
        """A fast shutdown (SIGINT to the postmaster: sessions end, nothing waits for clients)."""
        runner = self.runner
        if runner is None or not runner.alive:
            return
        postmaster = self._postmaster_pid()
        if postmaster is None:
            runner.kill()
            return
        os.kill(postmaster, signal.SIGINT)
        assert runner.popen is not None
        try:
            runner.popen.wait(grace)
        except subprocess.TimeoutExpired:
            runner.kill()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again (same port, same data)."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: the next start runs crash recovery."""
        if self.runner is None or self.runner.popen is None:
            return
        # Backends are session leaders of their own, out of reach of the runner's group
        # signal; left alive they would hold the shared memory the next start needs.
        cluster = _with_descendants(self.runner.popen.pid)
        self.runner.kill()
        for proc in cluster:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        _wait_dead(cluster)

    def destroy(self) -> None:
        """Kill it and delete its directory."""
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _clear_stale_locks(self) -> None:
        """Remove the lock files of a killed postmaster whose pid is dead or a zombie.

        PostgreSQL itself only checks that the pid exists, and in a container
        without a reaping init a killed postmaster can linger as a zombie.
        """
        for lock in (self.data / "postmaster.pid", self.workdir / f".s.PGSQL.{self.port}.lock"):
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if not _running(pid):
                lock.unlink(missing_ok=True)

    def _postmaster_pid(self) -> int | None:
        # The runner's own pid is runuser's when we are root; the pid file names postgres itself.
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _takes_connections(self) -> bool:
        import psycopg

        with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True


def _with_descendants(pid: int) -> list[psutil.Process]:
    try:
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _running(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_dead(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
