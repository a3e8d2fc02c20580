"""Builders for registry tests: a tiny Llama base, stock PEFT adapters, PostgreSQL
databases and a real SeaweedFS S3 server. Shared by tests/registry and tests/server."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.dev.seaweed import SeaweedFS
from server.dev.seaweed import s3_client as s3_client  # re-exported for the registry tests

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


@contextlib.contextmanager
def seaweedfs(
    workdir: Path, bucket: str, access_key: str, secret_key: str, timeout: float = 30.0
) -> Iterator[str]:
    """Run a real SeaweedFS server with S3; yields its endpoint URL with ``bucket`` created."""
    server = SeaweedFS(workdir, bucket, access_key, secret_key).start(timeout)
    try:
        yield server.endpoint
    finally:
        server.stop()


def blob_keys(store: Any) -> list[str]:
    """Every key a Local or S3 blob store holds (a test helper, not part of the store API)."""
    if hasattr(store, "root"):
        return sorted(
            p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()
        )
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "/")
    return sorted(obj["Key"] for obj in listing.get("Contents", []))
