"""The throwaway PostgreSQL cluster: real ``initdb`` and ``postgres`` binaries, a private port.

Committed rows must survive every way the chaos soak takes the server down: a
fast stop, a SIGKILL of the postmaster and its backends (crash recovery), and a
restart, all on the same port.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from server.dev.postgres import PostgresCluster


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    # Not tmp_path: pytest's directories are private to root, and as root the cluster runs
    # as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="loraplex-pg-test-"))
    pg = PostgresCluster(root)
    try:
        yield pg.start()
    finally:
        pg.destroy()
    assert not root.exists()


def rows(pg: PostgresCluster) -> list[int]:
    with psycopg.connect(pg.admin_url, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT n FROM t ORDER BY n").fetchall()]


def insert(pg: PostgresCluster, n: int) -> None:
    with psycopg.connect(pg.admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (n int)")
        conn.execute("INSERT INTO t VALUES (%s)", (n,))


def refuses_connections(pg: PostgresCluster) -> bool:
    try:
        psycopg.connect(pg.admin_url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return True
    return False


def test_committed_rows_survive_a_stop_a_kill_and_a_restart(cluster: PostgresCluster) -> None:
    port = cluster.port
    insert(cluster, 1)
    cluster.stop()
    assert not cluster.alive and refuses_connections(cluster)
    cluster.start()
    insert(cluster, 2)

    cluster.kill()  # postmaster and backends SIGKILLed: the next start runs crash recovery
    assert not cluster.alive and refuses_connections(cluster)
    cluster.start()
    insert(cluster, 3)

    cluster.restart(down_for=0.5)
    assert cluster.port == port and cluster.admin_url.endswith(f":{port}/postgres")
    assert rows(cluster) == [1, 2, 3]


def test_the_unix_socket_is_in_the_cluster_directory(cluster: PostgresCluster) -> None:
    socket = cluster.workdir / f".s.PGSQL.{cluster.port}"
    assert socket.is_socket()
    with psycopg.connect(host=str(cluster.workdir), port=cluster.port, user="postgres") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_directory_too_deep_for_the_socket_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(RuntimeError, match="too deep for a unix socket"):
        PostgresCluster(deep).init()
