"""``loraplex webhooks ...`` and ``loraplex events`` on a real (SQLite) registry."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

from registry import Actor, LocalBlobStore, Registry, audit
from registry.webhooks import Backoff, WebhookStore
from tests.server.cli.harness import Cli

OPERATOR = Actor("test", admin=True)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    registry.create_tenant("acme", OPERATOR)
    yield registry
    registry.close()


def test_create_list_rotate_deliveries_redeliver_delete(cli: Cli, registry: Registry) -> None:
    out = cli.ok("webhooks", "create", "http://127.0.0.1:9/hook", "--tenant", "acme",
                 "--events", "adapter.drift.detected", "--webhook-allow", "127.0.0.1")  # fmt: skip
    fields = dict(line.split(None, 1) for line in out.splitlines())
    hook, secret = fields["webhook"], fields["secret"].split()[0]
    assert secret.startswith("whsec_") and fields["events"] == "adapter.drift.detected"
    listed = cli.ok("webhooks", "list", "--tenant", "acme")
    assert hook in listed and "whsec_" not in listed
    rotated = cli.ok("webhooks", "rotate", hook, "--tenant", "acme", "--grace-hours", "1")
    assert "whsec_" in rotated and secret not in rotated and "signs beside it" in rotated
    tenant_id = registry.get_tenant("acme").id
    with Session(registry.database) as s, s.begin():
        audit.record(s, "gw", "adapter.drift", "adapter:acme/bot", tenant_id=tenant_id)
    store = WebhookStore(registry)
    store.fan_out()
    (claimed,) = store.claim("gw", dt.timedelta(seconds=30))
    store.finish(claimed.delivery_id, "gw", Backoff(max_attempts=1), 500, "HTTP 500")
    log = cli.ok("webhooks", "deliveries", hook, "--tenant", "acme")
    assert claimed.delivery_id in log and "dead" in log and "500" in log
    again = cli.ok("webhooks", "redeliver", hook, claimed.delivery_id, "--tenant", "acme")
    assert "pending again" in again
    events = cli.ok("events", "--tenant", "acme")
    assert "adapter.drift.detected" in events and "adapter:acme/bot" in events
    assert "deleted webhook" in cli.ok("webhooks", "delete", hook, "--tenant", "acme")
    code, _, err = cli("webhooks", "delete", hook, "--tenant", "acme")
    assert code == 1 and f"webhook {hook!r} does not exist" in err


def test_create_refuses_ssrf_targets(cli: Cli, registry: Registry) -> None:
    code, _, err = cli("webhooks", "create", "https://10.0.0.1/hook", "--tenant", "acme")
    assert code == 1 and "a private address" in err
    code, _, err = cli("webhooks", "create", "http://127.0.0.1:9/", "--tenant", "acme")
    assert code == 1 and "not https" in err
