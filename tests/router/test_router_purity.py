"""The router stays pure decision logic: importing it loads no I/O, asyncio or sibling package."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = {
    "asyncio",
    "socket",
    "sqlite3",
    "sqlalchemy",
    "httpx",
    "server",
    "registry",
    "training",
}


def test_importing_router_loads_no_io_modules() -> None:
    code = "import json, sys, router; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert "router" in loaded
    assert loaded & FORBIDDEN == set()
