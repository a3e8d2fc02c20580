"""Typed settings: one object, from ``LORAPLEX_*`` environment variables and CLI flags.

Each field's docstring is its documentation (``loraplex config`` prints the
table; README.md carries a copy). Loading collects every problem before
failing, so one start-up tells you everything that is wrong.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import os
import secrets
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.discovery import Discovery, DiscoveryError

ENV_PREFIX = "LORAPLEX_"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` accepts."""


class SettingsError(ValueError):
    """One or more settings are invalid; the message names each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid loraplex settings:\n{lines}")


@dataclass
class Settings:
    home: Path = Path(".loraplex")
    """Working directory for the embedded setup: database, blobs, caches, logs, demo base."""

    host: str = "127.0.0.1"
    """Address the gateway listens on."""

    port: int = 8000
    """Port the gateway listens on."""

    base_model: Path | None = None
    """Local Hugging Face model directory to serve. Default: the demo base under ``home``."""

    base_revision: str = "main"
    """Revision recorded when ``serve`` registers the local base model in the registry."""

    served_model_name: str = ""
    """Name clients use for the base model. Default: the base model directory's name."""

    engine_urls: list[str] = field(default_factory=list)
    """Comma-separated URLs of already-running vLLM engines. When set, ``serve`` starts none."""

    engine_discovery: str = ""
    """Find engines while running: ``dns://NAME:PORT`` (every address of a headless Service)
    or ``file:///PATH`` (one URL per line), re-read every few seconds. ``serve`` starts none."""

    engine_port: int = 8100
    """First loopback port for engines that ``serve`` starts itself."""

    engine_replicas: int = 1
    """Engines ``serve`` starts (ports ``engine_port`` upwards); none with ``engine_urls`` or
    ``engine_discovery``."""

    engine_api_key: str = ""
    """Internal key between gateway and engines. Default: a fresh random key per start."""

    metrics_token: str = ""
    """Bearer token ``/metrics`` requires (its labels name tenants and adapters). Empty: only
    loopback clients may read it."""

    engine_start_timeout: float = 600.0
    """Seconds to wait for a started engine to report healthy before giving up."""

    engine_memory_fraction: float = 0.2
    """vLLM ``--gpu-memory-utilization``; on the CPU build, the share of host RAM for KV cache."""

    engine_kv_cache_bytes: int = 0
    """KV cache of each started engine in bytes (vLLM ``--kv-cache-memory-bytes``); 0 sizes it
    by ``engine_memory_fraction``, except on the CPU build, where 0 means 1 GiB: that build
    sizes the fraction against NUMA node 0's memory less the engine's own use, which came out
    negative on a machine whose node 0 held 8 of its 24 GiB."""

    engine_max_model_len: int = 2048
    """vLLM ``--max-model-len``: longest prompt + completion an engine accepts."""

    engine_dtype: str = "auto"
    """vLLM ``--dtype``. ``auto`` is bfloat16 on the CPU build; float32 reproduces PEFT exactly."""

    engine_extra_args: str = ""
    """Extra command-line arguments for started engines, shell-quoted."""

    max_loras: int = 4
    """Adapters one engine batch may mix (vLLM ``--max-loras``)."""

    max_cpu_loras: int = 16
    """Adapters an engine keeps resident in host memory (vLLM ``--max-cpu-loras``)."""

    max_lora_rank: int = 64
    """Largest LoRA rank accepted on upload and served by engines."""

    max_request_bytes: int = 1 << 20
    """Largest request body the gateway accepts, in bytes."""

    max_tokens_limit: int = 4096
    """Largest ``max_tokens`` / ``max_completion_tokens`` a request may ask for."""

    upstream_timeout: float = 300.0
    """Seconds before an engine request with no response is abandoned (504)."""

    upstream_connect_timeout: float = 5.0
    """Seconds to wait for a connection to an engine (502/503 past that)."""

    database_url: str = ""
    """SQLAlchemy URL of the registry. Default: SQLite at ``home/registry.db``."""

    blob_url: str = ""
    """Blob store: a local directory, or ``s3://bucket/prefix``. Default: ``home/blobs``."""

    s3_endpoint_url: str = ""
    """S3 endpoint for S3-compatible stores (SeaweedFS, MinIO). Empty: AWS."""

    adapter_cache_bytes: int = 4 << 30
    """Disk each engine's adapter cache may use before evicting least-recently-used adapters."""

    max_upload_bytes: int = 512 << 20
    """Largest adapter upload (archive or files together), in bytes."""

    log_level: str = "info"
    """Log level: debug, info, warning or error."""

    # -- derived defaults -------------------------------------------------

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'registry.db').resolve()}"

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or str((self.home / "blobs").resolve())

    @property
    def resolved_base_model(self) -> Path:
        return (self.base_model or self.home / "demo-base").resolve()

    @property
    def resolved_served_model_name(self) -> str:
        return self.served_model_name or self.resolved_base_model.name

    def resolved_kv_cache_bytes(self) -> int:
        """The ``--kv-cache-memory-bytes`` for started engines; 0 leaves vLLM's own sizing."""
        if self.engine_kv_cache_bytes or not vllm_cpu_build():
            return self.engine_kv_cache_bytes
        return CPU_KV_CACHE_BYTES

    @property
    def external_engines(self) -> bool:
        """Whether engines run elsewhere (``engine_urls`` or ``engine_discovery``)."""
        return bool(self.engine_urls or self.engine_discovery)

    def validate(self) -> None:
        problems: list[str] = []

        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                problems.append(f"{env_name(name)} (--{flag_name(name)}): {why}")

        check(1 <= self.port <= 65535, "port", f"{self.port} is not a TCP port")
        check(
            1 <= self.engine_port <= 65535, "engine_port", f"{self.engine_port} is not a TCP port"
        )
        check(
            0.0 < self.engine_memory_fraction <= 1.0,
            "engine_memory_fraction",
            "must be in (0, 1]",
        )
        for name in ("engine_start_timeout", "upstream_timeout", "upstream_connect_timeout"):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.engine_kv_cache_bytes >= 0, "engine_kv_cache_bytes", "must be 0 or more")
        for name in (
            "engine_max_model_len",
            "max_loras",
            "max_cpu_loras",
            "max_lora_rank",
            "max_request_bytes",
            "max_tokens_limit",
            "max_upload_bytes",
            "engine_replicas",
            "adapter_cache_bytes",
        ):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.max_cpu_loras >= self.max_loras, "max_cpu_loras", "must be >= max_loras")
        for url in self.engine_urls:
            check(
                url.startswith(("http://", "https://")),
                "engine_urls",
                f"{url!r} is not an http(s) URL",
            )
        if self.engine_discovery:
            check(
                not self.engine_urls,
                "engine_discovery",
                "set engine_discovery or engine_urls, not both",
            )
            try:
                Discovery.parse(self.engine_discovery)
            except DiscoveryError as exc:
                check(False, "engine_discovery", str(exc))
        check(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level",
            f"{self.log_level!r} is not one of debug, info, warning, error",
        )
        check(
            self.engine_dtype in ("auto", "bfloat16", "float16", "float32"),
            "engine_dtype",
            f"{self.engine_dtype!r} is not one of auto, bfloat16, float16, float32",
        )
        check(
            self.max_lora_rank in VLLM_LORA_RANKS,
            "max_lora_rank",
            f"vLLM accepts only {', '.join(map(str, VLLM_LORA_RANKS))}",
        )
        if problems:
            raise SettingsError(problems)

    def ensure_engine_key(self) -> str:
        if not self.engine_api_key:
            self.engine_api_key = secrets.token_urlsafe(32)
        return self.engine_api_key


CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache of a started engine on vLLM's CPU build when none is set."""


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (the ``vllm-cpu`` distribution)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return field_name.replace("_", "-")


def field_docs() -> dict[str, str]:
    """Field name -> its docstring, read from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _convert(raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = next(a for a in args if a is not type(None))
        return None if raw == "" else _convert(raw, inner)
    if origin is list:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{raw!r} is not a boolean")
    if kind is Path:
        return Path(raw).expanduser()
    return kind(raw)


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from defaults, then ``LORAPLEX_*`` variables, then ``overrides`` (CLI flags).

    Overrides whose value is None are ignored, so argparse namespaces can be
    passed as they are.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(Settings):
        raw = environ.get(env_name(f.name))
        if raw is not None:
            try:
                values[f.name] = _convert(raw, hints[f.name])
            except ValueError as exc:
                problems.append(f"{env_name(f.name)}: cannot read {raw!r}: {exc}")
    known = {f.name for f in dataclasses.fields(Settings)}
    for name, value in (overrides or {}).items():
        if value is None or name not in known:
            continue
        if isinstance(value, str) and hints[name] is not str:
            try:
                value = _convert(value, hints[name])
            except ValueError as exc:
                problems.append(f"--{flag_name(name)}: cannot read {value!r}: {exc}")
                continue
        values[name] = value
    if problems:
        raise SettingsError(problems)
    settings = Settings(**values)
    settings.validate()
    return settings


def add_settings_flags(parser: Any, names: list[str] | None = None) -> None:
    """Add ``--flag`` options for settings (all, or ``names``) to an argparse parser."""
    docs = field_docs()
    for f in dataclasses.fields(Settings):
        if names is not None and f.name not in names:
            continue
        parser.add_argument(
            f"--{flag_name(f.name)}", dest=f.name, default=None, help=docs.get(f.name, "")
        )
