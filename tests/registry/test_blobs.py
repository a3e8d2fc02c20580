"""Blob stores: atomic writes, verified reads, corruption never served (local dir and S3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import BUCKET, S3_KEY, S3_SECRET, s3_store
from registry_testdata import blob_keys

from registry import (
    AdapterVersion,
    BlobStore,
    CorruptBlob,
    LocalBlobStore,
    NotFound,
    Registry,
    S3BlobStore,
    open_blob_store,
)


def _file(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _overwrite(store: BlobStore, key: str, data: bytes) -> None:
    """Corrupt a stored blob behind the store's back (test helper)."""
    if isinstance(store, LocalBlobStore):
        (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)


def test_put_fetch_round_trip_and_put_is_idempotent(blob_store: BlobStore, tmp_path: Path) -> None:
    src, sha = _file(tmp_path, b"adapter bytes" * 1000)
    assert not blob_store.exists("adapters/a.tar")
    blob_store.put("adapters/a.tar", src)
    blob_store.put("adapters/a.tar", src)
    assert blob_store.exists("adapters/a.tar")
    blob_store.fetch("adapters/a.tar", sha, tmp_path / "out" / "a.tar")
    assert (tmp_path / "out" / "a.tar").read_bytes() == src.read_bytes()
    assert blob_keys(blob_store)[-1].endswith("adapters/a.tar")
    blob_store.delete("adapters/a.tar")
    assert not blob_store.exists("adapters/a.tar")


def test_corrupt_blob_is_reported_and_never_written_out(
    blob_store: BlobStore, tmp_path: Path
) -> None:
    src, sha = _file(tmp_path, b"good")
    blob_store.put("k.tar", src)
    _overwrite(blob_store, "k.tar", b"evil")
    dest = tmp_path / "out" / "k.tar"
    with pytest.raises(CorruptBlob, match=r"blob k\.tar is corrupt: expected sha256") as caught:
        blob_store.fetch("k.tar", sha, dest)
    assert caught.value.actual == hashlib.sha256(b"evil").hexdigest()
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_missing_blob_is_not_found(blob_store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"blob gone\.tar is missing"):
        blob_store.fetch("gone.tar", "0" * 64, tmp_path / "x")


def test_s3_multipart_upload(s3_endpoint: str, tmp_path: Path) -> None:
    store = s3_store(s3_endpoint, "multipart", multipart_threshold=5 << 20)
    src, sha = _file(tmp_path, bytes(range(256)) * (48 << 10))  # 12 MiB
    store.put("big.tar", src)
    head = store.client.head_object(Bucket="loraplex-test", Key="multipart/big.tar")
    # S3 marks multipart objects "<md5>-<parts>"; boto3 cuts 8 MiB parts.
    assert head["ETag"].strip('"').endswith("-2")
    store.fetch("big.tar", sha, tmp_path / "big.tar")
    assert (tmp_path / "big.tar").read_bytes() == src.read_bytes()


def test_open_blob_store_reads_urls(tmp_path: Path) -> None:
    local = open_blob_store(str(tmp_path / "blobs"))
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "blobs"
    s3 = open_blob_store("s3://bucket/some/prefix", "http://127.0.0.1:1")
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    with pytest.raises(ValueError, match="names no bucket"):
        open_blob_store("s3:///x")


def test_fetch_version_refuses_a_corrupt_blob(
    registry: Registry, bot_v1: AdapterVersion, tmp_path: Path
) -> None:
    _overwrite(registry.blobs, bot_v1.blob_key, b"tampered")
    with pytest.raises(CorruptBlob):
        registry.fetch_version(bot_v1.lora_name, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_s3_store_reads_credentials_from_the_environment_when_created(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    stale = S3BlobStore(BUCKET, "env", endpoint_url=s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = S3BlobStore(BUCKET, "env", endpoint_url=s3_endpoint)
    src, sha = _file(tmp_path, b"from env")
    store.put("e.tar", src)
    store.fetch("e.tar", sha, tmp_path / "e.tar")
    assert (tmp_path / "e.tar").read_bytes() == b"from env"
    with pytest.raises(ClientError):
        stale.exists("e.tar")
