"""Every size and length bound of the gateway, on the real app (SQLite registry, no engine).

Request bodies (declared and streamed), ``max_tokens`` / ``max_completion_tokens``
and ``n``, a tenant's prompt + completion bound, adapter uploads (declared and
streamed) and archives that expand past the upload limit or hold too many files.
Each limit is checked on both sides: one past it is refused with a precise
OpenAI-shaped error, exactly at it passes on to the next step.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from registry import TENANT_SCOPE, Actor, LocalBlobStore, Registry, TenantLimits, UploadLimits
from server.app import create_app
from server.config import Settings
from server.gateway.replicas import Engine
from tests import reliability
from tests.e2e.probes import Probes
from tests.registry.registry_testdata import build_adapter, build_tiny_base

pytestmark = pytest.mark.reliability

ROOT = Actor("test-root", admin=True)
BODY_LIMIT = 4096
TOKENS_LIMIT = 256
UPLOAD_LIMIT = 200_000
MAX_MEMBERS = 8
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Gateway:
    http: TestClient
    registry: Registry
    auth: dict[str, str]
    tenant_id: int
    base: str
    adapter: Path


@pytest.fixture(scope="module")
def peft(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("peft")
    base = build_tiny_base(root / "tiny")
    return base, build_adapter(base, root / "adapter", seed=1)


@pytest.fixture
def gw(tmp_path: Path, peft: tuple[Path, Path]) -> Iterator[Gateway]:
    base, adapter = peft
    limits = UploadLimits(max_total_bytes=UPLOAD_LIMIT, max_members=MAX_MEMBERS)
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", LocalBlobStore(tmp_path / "b"), limits)
    record = registry.register_base(base, "tiny", "r1", ROOT)
    tenant = registry.create_tenant("acme", ROOT)
    assert tenant.id is not None
    _, key = registry.create_api_key(tenant.id, TENANT_SCOPE, ROOT)
    settings = Settings(
        home=tmp_path, base_model=base, max_request_bytes=BODY_LIMIT, max_tokens_limit=TOKENS_LIMIT
    )
    # An engine of the base that never answers: requests that pass every check get a 503.
    silent = Engine("http://127.0.0.1:9", record.fingerprint, settings.resolved_served_model_name)
    app = create_app(settings, registry, engines=[silent])
    yield Gateway(TestClient(app), registry, {"authorization": f"Bearer {key}"}, tenant.id,
                  settings.resolved_served_model_name, adapter)  # fmt: skip
    registry.close()


def _finish(check: str, probes: Probes) -> None:
    reliability.record("limits", check, probes.tried, "requests", len(probes.leaks), "not bounded")
    assert probes.leaks == []


def _padded(size: int) -> bytes:
    """A JSON completion body of exactly ``size`` bytes, for a model nobody has."""
    head, tail = b'{"model": "nobody", "prompt": "', b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def _chunks(content: bytes) -> Iterator[bytes]:
    """A body sent without Content-Length (chunked), so only counting can bound it."""
    for start in range(0, len(content), 1024):
        yield content[start : start + 1024]


def test_request_bodies_are_bounded_declared_or_streamed(gw: Gateway) -> None:
    probes = Probes()
    headers = {**gw.auth, "content-type": "application/json"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        over = gw.http.post(path, content=_padded(BODY_LIMIT + 1), headers=headers)
        probes.error(over, 413, f"{path}: declared body one byte over")
        probes.check("the limit is 4096" in over.text, f"message {over.text}")
        streamed = gw.http.post(path, content=_chunks(_padded(4 * BODY_LIMIT)), headers=headers)
        probes.error(streamed, 413, f"{path}: streamed body over")
        probes.check("limit of 4096 bytes" in streamed.text, f"message {streamed.text}")
        at = gw.http.post(path, content=_padded(BODY_LIMIT), headers=headers)
        probes.error(at, 404, f"{path}: a body at the limit goes on to name resolution")
    _finish("request body bytes (declared, streamed, at the limit)", probes)


def test_completion_lengths_and_choices_are_bounded(gw: Gateway) -> None:
    probes = Probes()
    for name in ("max_tokens", "max_completion_tokens"):
        over = gw.http.post("/v1/chat/completions", headers=gw.auth,
                            json={"model": "nobody", name: TOKENS_LIMIT + 1})  # fmt: skip
        probes.error(over, 400, f"{name} one over")
        probes.check(over.json()["error"]["code"] == "max_tokens_exceeded", over.text)
        probes.check(f"at most {TOKENS_LIMIT}" in over.text, over.text)
        at = gw.http.post("/v1/chat/completions", headers=gw.auth,
                          json={"model": "nobody", name: TOKENS_LIMIT})  # fmt: skip
        probes.error(at, 404, f"{name} at the limit goes on to name resolution")
    for n, status in ((17, 400), (0, 400), (16, 404)):
        reply = gw.http.post("/v1/completions", headers=gw.auth,
                             json={"model": "nobody", "prompt": "x", "n": n})  # fmt: skip
        probes.error(reply, status, f"n={n}")
    _finish("max_tokens, max_completion_tokens, n", probes)


def test_prompt_plus_completion_is_bounded_per_tenant(gw: Gateway) -> None:
    gw.registry.set_tenant_limits(gw.tenant_id, TenantLimits(max_total_tokens=100), ROOT)
    probes = Probes()
    cases = [
        ({"prompt": "a" * 300, "max_tokens": 1}, 400),  # ~100 prompt tokens + 1
        ({"prompt": "hi", "max_tokens": 101}, 400),
        ({"messages": [{"role": "user", "content": "a" * 400}], "max_tokens": 1}, 400),
        ({"prompt": "a" * 30, "max_tokens": 50}, 503),  # admitted; no engine runs here
    ]
    for extra, status in cases:
        path = "/v1/chat/completions" if "messages" in extra else "/v1/completions"
        reply = gw.http.post(path, headers=gw.auth, json={"model": gw.base, **extra})
        probes.error(reply, status, f"{list(extra)} -> {reply.text[:200]}")
        if status == 400:
            code = reply.json()["error"]["code"]
            probes.check(code == "max_total_tokens_exceeded", f"code {code}")
    _finish("prompt + completion tokens per request (tenant limit)", probes)


def _multipart(files: list[tuple[str, bytes]], boundary: str = "loraplexlimit") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
        for name, content in files
    ]
    for field, value in (("name", "bot"), ("base", "tiny")):
        disposition = f'Content-Disposition: form-data; name="{field}"'
        parts.append(f"--{boundary}\r\n{disposition}\r\n\r\n{value}\r\n".encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _push(gw: Gateway, files: list[tuple[str, bytes]], chunked: bool = False) -> httpx.Response:
    body = _multipart(files)
    headers = {**gw.auth, "content-type": "multipart/form-data; boundary=loraplexlimit"}
    return gw.http.post("/v1/adapters", content=_chunks(body) if chunked else body, headers=headers)


def _adapter_files(gw: Gateway) -> list[tuple[str, bytes]]:
    return [(name, (gw.adapter / name).read_bytes()) for name in FILES]


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            # The file type in the mode bits, as zip tools write it (writestr(str) leaves it out).
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, content, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def test_uploads_are_bounded_declared_or_streamed(gw: Gateway) -> None:
    probes = Probes()
    padding = ("README.md", b"x" * (UPLOAD_LIMIT + (64 << 10) + 1))
    declared = _push(gw, [*_adapter_files(gw), padding])
    probes.error(declared, 413, "declared upload over the limit")
    streamed = _push(gw, [*_adapter_files(gw), ("README.md", b"x" * UPLOAD_LIMIT)], chunked=True)
    probes.error(streamed, 413, "streamed upload over the limit")
    for reply in (declared, streamed):
        probes.check(reply.json()["error"]["code"] == "upload_too_large", reply.text)
    fine = _push(gw, _adapter_files(gw), chunked=True)
    probes.check(fine.status_code == 201, f"an upload within the limit: {fine.text[:300]}")
    _finish("adapter upload bytes (declared, streamed)", probes)


def test_archives_are_bounded_by_expanded_size_and_member_count(gw: Gateway) -> None:
    probes = Probes()
    files = dict(_adapter_files(gw))
    bomb = _zip({**files, "README.md": b"\0" * (4 * UPLOAD_LIMIT)})  # tiny compressed
    many = _zip({**files, **{f"notes/{i}/README.md": b"" for i in range(MAX_MEMBERS)}})
    for label, archive, fragment in [
        ("expands past the limit", bomb, f"more than the {UPLOAD_LIMIT}-byte limit"),
        ("too many members", many, f"more than {MAX_MEMBERS} files"),
    ]:
        reply = _push(gw, [("adapter.zip", archive)])
        probes.error(reply, 422, f"zip that {label}")
        probes.check(fragment in reply.text, f"{label}: {reply.text[:300]}")
    probes.check(gw.registry.list_adapters(gw.tenant_id) == [], "a refused upload left a record")
    _finish("archives (expanded bytes, member count)", probes)


def _tgz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def test_damaged_archives_are_refused_not_server_errors(gw: Gateway) -> None:
    probes = Probes()
    files = dict(_adapter_files(gw))
    zipped, tarred = bytearray(_zip(files)), _tgz(files)
    weights_at = zipped.find(b"adapter_model.safetensors")
    zipped[weights_at + 200 : weights_at + 260] = b"\xff" * 60  # inside the deflated data
    http = TestClient(gw.http.app, raise_server_exceptions=False)
    gw.http = http
    for name, archive in [("a.zip", bytes(zipped)), ("a.tar.gz", tarred[: len(tarred) // 2])]:
        reply = _push(gw, [(name, archive)])
        probes.error(reply, 422, f"damaged {name}")
        probes.check("corrupt or truncated" in reply.text, f"{name}: {reply.text[:300]}")
    _finish("damaged archives (corrupt zip, truncated tar.gz)", probes)
