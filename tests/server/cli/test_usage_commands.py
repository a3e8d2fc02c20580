"""``loraplex usage`` on a real (SQLite) registry: a table with totals, one tenant's, CSV."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from registry import Actor, LocalBlobStore, Registry
from tests.server.cli.harness import Cli

OPERATOR = Actor("test", admin=True)
DAY = dt.date(2025, 11, 30)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "blobs"))
    for name, requests in (("acme", 3), ("globex", 5)):
        tenant_id = registry.create_tenant(name, OPERATOR).id
        assert tenant_id is not None
        registry.record_usage(tenant_id, "bot", 1, requests=requests, prompt_tokens=10 * requests,
                              completion_tokens=requests, day=DAY)  # fmt: skip
    registry.close()
    return Cli(tmp_path, capsys)


RANGE = ("--since", "2025-11-01", "--until", "2025-12-01")


def test_a_table_of_every_tenant_with_totals_or_one_tenants(cli: Cli) -> None:
    lines = cli.ok("usage", *RANGE).splitlines()
    assert lines[0].split() == ["TENANT", "DAY", "ADAPTER", "VERSION", "REQUESTS",
                                "PROMPT_TOKENS", "COMPLETION_TOKENS", "ERRORS"]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["acme", "globex", "total"]
    assert lines[-1].split() == ["total", "2025-11-01..2025-12-01", "8", "80", "8", "0"]
    own = cli.ok("usage", "--tenant", "globex", *RANGE).splitlines()
    assert own[-1].split()[2:] == ["5", "50", "5", "0"]


def test_csv_and_refusals(cli: Cli) -> None:
    table = cli.ok("usage", "--csv", *RANGE).splitlines()
    assert table[0] == "tenant,day,adapter,version,requests,prompt_tokens,completion_tokens,errors"
    assert table[1:] == ["acme,2025-11-30,bot,1,3,30,3,0", "globex,2025-11-30,bot,1,5,50,5,0"]
    code, _, err = cli("usage", "--since", "2025-12-05", "--until", "2025-12-01")
    assert code == 1 and "after until" in err
    code, _, err = cli("usage", "--tenant", "nobody")
    assert code == 1 and "does not exist" in err
