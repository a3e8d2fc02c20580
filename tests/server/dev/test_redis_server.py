"""The throwaway redis-server: a private port, no persistence, back at the same URL after a kill."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from server.dev.redis_server import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = RedisServer(tmp_path / "redis").start()
    try:
        yield started
    finally:
        started.kill()


def test_a_killed_server_comes_back_at_the_same_url_empty(server: RedisServer) -> None:
    url = server.url
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.set("bucket", "5")
    server.kill()
    assert not server.alive
    with pytest.raises(redis.ConnectionError):
        client.get("bucket")
    server.start()
    assert server.url == url
    assert client.get("bucket") is None  # nothing was persisted
    assert not list((server.workdir).glob("*.rdb")) and not list(server.workdir.glob("*.aof"))


def test_stop_is_graceful(server: RedisServer) -> None:
    server.stop()
    assert not server.alive
    assert server.runner is not None and server.runner.popen is not None
    assert server.runner.popen.returncode == 0
