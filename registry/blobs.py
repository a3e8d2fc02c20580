"""Blob stores: a local directory or S3, content-addressed, atomic writes, verified reads.

Keys are derived from fingerprints by the caller. A write becomes visible
only once complete (temp file + fsync + rename locally; S3 uploads the
object only after the bytes are all there, multipart for large files). A read
streams into a temporary file next to its destination, checks the SHA-256
and raises ``CorruptBlob`` instead of handing out bad bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from registry.errors import CorruptBlob, NotFound

_CHUNK = 1 << 20

Progress = Callable[[int, int], None]
"""Called as bytes go out: (bytes sent so far, total bytes)."""


class BlobStore(Protocol):
    """Where adapter blobs live. Implementations must be safe to share between threads."""

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, source: Path, progress: Progress | None = None) -> None:
        """Store ``source`` under ``key`` atomically; a no-op if ``key`` exists."""

    def fetch(self, key: str, sha256: str, dest: Path) -> None:
        """Write the blob to ``dest`` after checking it hashes to ``sha256``."""

    def delete(self, key: str) -> None: ...


@contextlib.contextmanager
def _temp_beside(dest: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A temp file in ``dest``'s directory, removed unless the caller renamed it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
    finally:
        tmp.unlink(missing_ok=True)


def _commit(f: BinaryIO, tmp: Path, dest: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    os.replace(tmp, dest)
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verified_copy(chunks: Iterator[bytes], key: str, sha256: str, dest: Path) -> None:
    with _temp_beside(dest) as (f, tmp):
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
        if digest.hexdigest() != sha256:
            raise CorruptBlob(key, sha256, digest.hexdigest())
        _commit(f, tmp, dest)


def _missing(key: str) -> NotFound:
    return NotFound(f"blob {key} is missing from the blob store; restore it from backup")


class LocalBlobStore:
    """Blobs as files under one directory (the embedded default)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, source: Path, progress: Progress | None = None) -> None:
        dest = self._path(key)
        total, sent = source.stat().st_size, 0
        if dest.is_file():
            if progress:
                progress(total, total)
            return
        with _temp_beside(dest) as (f, tmp), source.open("rb") as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                f.write(chunk)
                sent += len(chunk)
                if progress:
                    progress(sent, total)
            _commit(f, tmp, dest)

    def fetch(self, key: str, sha256: str, dest: Path) -> None:
        path = self._path(key)
        try:
            src = path.open("rb")
        except FileNotFoundError:
            raise _missing(key) from None
        with src:
            _verified_copy(iter(lambda: src.read(_CHUNK), b""), key, sha256, dest)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def _s3_client_config() -> Any:
    """Bounded waits: botocore's defaults (60 s per read, retried) let a stalled store hold
    the engine resolver's fetch threads for minutes, queueing every other cold load."""
    from botocore.config import Config

    return Config(
        connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"}
    )


class S3BlobStore:
    """Blobs as objects in an S3 bucket (AWS or S3-compatible, e.g. SeaweedFS, MinIO)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        multipart_threshold: int = 64 << 20,
        client: Any = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # A session of its own: boto3's default session keeps the first credentials it
        # resolved for the life of the process, whatever the environment says later.
        session = boto3.session.Session()
        self.client = client or session.client(
            "s3", endpoint_url=endpoint_url or None, config=_s3_client_config()
        )
        # upload_file sends one PUT, or a multipart upload completed only after every part.
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold)

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def put(self, key: str, source: Path, progress: Progress | None = None) -> None:
        total = source.stat().st_size
        if self.exists(key):
            if progress:
                progress(total, total)
            return
        sent = 0

        def callback(amount: int) -> None:  # boto3 reports increments, from worker threads
            nonlocal sent
            sent += amount
            if progress:
                progress(sent, total)

        self.client.upload_file(
            str(source), self.bucket, self._key(key), Config=self.transfer, Callback=callback
        )

    def fetch(self, key: str, sha256: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise _missing(key) from None
            raise
        body = response["Body"]
        with contextlib.closing(body):
            _verified_copy(body.iter_chunks(_CHUNK), key, sha256, dest)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def put_bytes(store: BlobStore, key: str, data: bytes) -> str:
    """Store ``data`` under ``key`` (through a temporary file, as ``put`` takes files);
    returns its SHA-256, which ``fetch_bytes`` checks."""
    with tempfile.TemporaryDirectory(prefix="loraplex-blob-") as tmp:
        path = Path(tmp) / "data"
        path.write_bytes(data)
        store.put(key, path)
    return hashlib.sha256(data).hexdigest()


def fetch_bytes(store: BlobStore, key: str, sha256: str) -> bytes:
    """The blob's bytes, checked against ``sha256``."""
    with tempfile.TemporaryDirectory(prefix="loraplex-blob-") as tmp:
        path = Path(tmp) / "data"
        store.fetch(key, sha256, path)
        return path.read_bytes()


def open_blob_store(
    url: str, s3_endpoint_url: str | None = None, s3_client: Any = None
) -> BlobStore:
    """``s3://bucket/prefix`` -> S3BlobStore (through ``s3_client`` if given, for credentials
    of its own); anything else is a local directory path."""
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"blob URL {url!r} names no bucket; use s3://bucket/prefix")
        return S3BlobStore(bucket, prefix, endpoint_url=s3_endpoint_url, client=s3_client)
    return LocalBlobStore(Path(url).expanduser())
