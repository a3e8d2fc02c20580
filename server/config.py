"""Typed settings: one object, from ``LORAPLEX_*`` environment variables and CLI flags.

Each field's docstring is its documentation (``loraplex config`` prints the
table; README.md carries a copy). Loading collects every problem before
failing, so one start-up tells you everything that is wrong.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import os
import re
import secrets
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.gateway.discovery import Discovery, DiscoveryError

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
    """vLLM ``--dtype``. ``auto``: the dtype the base was saved in (its ``config.json``), so a
    float32 base serves in float32 and reproduces PEFT's greedy output exactly (vLLM's own
    ``auto`` serves float32 bases in bfloat16 on the CPU build); bfloat16 halves the
    weights' memory at that cost."""

    engine_step_tokens: int = 0
    """Tokens one engine step computes at most (vLLM ``--max-num-batched-tokens``). No
    gateway can interrupt a step once begun, so a quiet tenant's request beside a flood
    waits for about two of them: shorter steps, shorter waits, and less throughput (each
    step costs a fixed overhead). 0: 512 on vLLM's CPU build, where a 2,048-token step
    takes about 100 ms; vLLM's own default on GPUs (2,048 to 16,384 by GPU)."""

    engine_prefill_chunk_tokens: int = 0
    """Prompt tokens one request may prefill in an engine step while others wait (vLLM
    ``--long-prefill-token-threshold``), so a long prompt in progress leaves room in every
    step for a request that just arrived. 0: a quarter of ``engine_step_tokens`` (of 2,048
    where vLLM sizes the step), at most ``engine_max_model_len``."""

    engine_extra_args: str = ""
    """Extra command-line arguments for started engines, shell-quoted; they come last, so
    they override loraplex's own (``--scheduling-policy fcfs``, say)."""

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

    redis_url: str = ""
    """Redis holding tenant limits every gateway shares (``redis://HOST:PORT/DB``, or
    ``rediss://`` for TLS). Empty: each gateway counts limits in its own memory, so N
    gateways give a tenant N times its quota."""

    redis_timeout: float = 0.25
    """Seconds a request waits for Redis at most when checking its tenant's limits; past
    that, ``limits_on_redis_failure`` decides."""

    limits_on_redis_failure: str = "local"
    """When Redis is down or slow: ``local`` counts limits in this gateway's memory until it
    answers again; ``refuse`` answers a retryable 503 ``limits_unavailable``."""

    fair_queueing: bool = True
    """Hold requests at the gateway while their tenant's in-flight budget or their engines'
    in-flight tokens or prompt tokens are used up, start them in deficit-round-robin order
    across tenants, and send each with an engine priority, its tenant's share of the engines
    (vLLM schedules the lowest first; a client's own ``priority`` is ignored): a tenant
    flooding long prompts waits behind its own requests, not in front of everyone's. Off:
    every admitted request goes to an engine at once, all at one priority (vLLM serves them
    first come, first served)."""

    engine_max_in_flight_tokens: int = 0
    """Tokens (prompt as characters / 3, + max completion) of the requests one engine replica
    is sent at once; more wait at the gateway. 0: 16 x ``engine_max_model_len``, sixteen
    full-length sequences: room for many requests to decode together, not the whole KV cache
    (prefill is bounded by ``engine_max_in_flight_prompt_tokens``)."""

    engine_max_in_flight_prompt_tokens: int = 0
    """Prompt tokens (characters / 3) of the requests one engine replica is sent at once;
    more wait at the gateway, and a tenant's requests may hold half of them. Prefill is what
    fills an engine's steps: bounding it keeps the prompts in an engine to a few steps'
    worth, so a quiet tenant's request finds room in the next step, without bounding how
    many short-prompt requests decode together (a long prompt holds its share until its
    answer ends, though: raise this for long prompts with long answers). 0: 8 x
    ``engine_step_tokens`` (4,096 on the CPU build); no bound where vLLM sizes the step (GPUs,
    whose steps of 2,048 to 16,384 tokens free room every step or two anyway)."""

    tenant_max_in_flight_tokens: int = 0
    """Tokens one tenant's requests in flight may hold at once through this gateway; further
    ones wait behind them. 0: half of what the healthy replicas of the request's base take
    together, so another tenant always finds room."""

    fair_queue_timeout: float = 30.0
    """Seconds a request may wait at the gateway's fair queue; past that a retryable answer
    with ``Retry-After``: 429 if it waited behind its own tenant's requests, 503 if behind
    everyone's."""

    drift_threshold: float = 0.35
    """Drift score past which an adapter's prompts count as drifted: the audit log records
    ``adapter.drift`` once per crossing (``adapter.drift_cleared`` back under it). The score
    (``loraplex_adapter_drift``) runs from 0, prompts of the last 7 days like the production
    version's training prompts, to 1, nothing alike."""

    drift_interval: float = 15.0
    """Seconds between the gateway's flushes of the prompts it routed to adapters into their
    live drift sketches, each followed by a check of their drift."""

    shadow_max_in_flight: int = 4
    """Shadow copies (of production requests, for an adapter's ``shadow`` candidate) one
    gateway has out at once; more are dropped and counted, never queued. 0 turns shadow
    traffic off on this gateway."""

    webhook_allow: list[str] = field(default_factory=list)
    """Comma-separated host names and CIDRs webhooks may target although the SSRF guard
    refuses them (loopback, private, link-local... addresses), plain ``http`` included.
    Empty: webhooks go only to ``https`` URLs whose every address is public."""

    webhook_max_attempts: int = 8
    """Attempts at delivering one webhook message before it is ``dead`` (redeliver it by
    hand then)."""

    webhook_backoff: float = 1.0
    """Seconds before a failed webhook delivery's second attempt, doubling after each
    further failure up to ``webhook_backoff_max``."""

    webhook_backoff_max: float = 300.0
    """Longest wait in seconds between two attempts at one webhook message."""

    webhook_timeout: float = 10.0
    """Seconds one webhook delivery may take (connect, send, answer) before it counts as
    failed."""

    webhook_max_per_tenant: int = 20
    """Webhook subscriptions one tenant may have."""

    webhook_interval: float = 1.0
    """Seconds between a gateway's looks at the event log and the delivery queue while
    nothing is due."""

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

    def resolved_engine_dtype(self) -> str:
        """The ``--dtype`` for started engines: ``engine_dtype``, or with ``auto`` the base's
        saved dtype when it names one vLLM takes (else vLLM's own ``auto``)."""
        if self.engine_dtype != "auto":
            return self.engine_dtype
        saved = saved_dtype(self.resolved_base_model)
        return saved if saved in ("float32", "bfloat16", "float16") else "auto"

    def resolved_step_tokens(self) -> int:
        """The ``--max-num-batched-tokens`` for started engines; 0 leaves vLLM's own (GPU)."""
        if self.engine_step_tokens or not vllm_cpu_build():
            return self.engine_step_tokens
        return CPU_STEP_TOKENS

    def resolved_prefill_chunk_tokens(self) -> int:
        """The ``--long-prefill-token-threshold`` for started engines."""
        step = self.resolved_step_tokens() or VLLM_STEP_TOKENS
        return min(
            self.engine_prefill_chunk_tokens or step // PREFILL_CHUNKS, self.engine_max_model_len
        )

    def resolved_max_in_flight_prompt_tokens(self) -> int:
        """Prompt tokens one replica is sent at once; 0: no bound."""
        return self.engine_max_in_flight_prompt_tokens or (
            REPLICA_PROMPT_TOKENS_PER_STEP * self.resolved_step_tokens()
        )

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
        for name in (
            "engine_start_timeout",
            "upstream_timeout",
            "upstream_connect_timeout",
            "redis_timeout",
            "fair_queue_timeout",
            "drift_interval",
            "webhook_timeout",
            "webhook_interval",
            "webhook_backoff_max",
        ):
            check(getattr(self, name) > 0, name, "must be positive")
        check(self.webhook_backoff >= 0, "webhook_backoff", "must be 0 or more")
        check(0.0 <= self.drift_threshold <= 1.0, "drift_threshold", "must be in [0, 1]")
        for name in (
            "engine_kv_cache_bytes",
            "engine_step_tokens",
            "engine_prefill_chunk_tokens",
            "engine_max_in_flight_tokens",
            "engine_max_in_flight_prompt_tokens",
            "tenant_max_in_flight_tokens",
            "shadow_max_in_flight",
        ):
            check(getattr(self, name) >= 0, name, "must be 0 or more")
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
            "webhook_max_attempts",
            "webhook_max_per_tenant",
        ):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.max_cpu_loras >= self.max_loras, "max_cpu_loras", "must be >= max_loras")
        self._check_engine_sources(check)
        self._check_redis(check)
        self._check_choices(check)
        if problems:
            raise SettingsError(problems)

    def _check_engine_sources(self, check: Callable[[bool, str, str], None]) -> None:
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

    def _check_redis(self, check: Callable[[bool, str, str], None]) -> None:
        check(
            self.limits_on_redis_failure in ("local", "refuse"),
            "limits_on_redis_failure",
            f"{self.limits_on_redis_failure!r} is not one of local, refuse",
        )
        if self.redis_url:
            problem = redis_url_problem(self.redis_url)
            check(not problem, "redis_url", problem)

    def _check_choices(self, check: Callable[[bool, str, str], None]) -> None:
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

    def ensure_engine_key(self) -> str:
        if not self.engine_api_key:
            self.engine_api_key = secrets.token_urlsafe(32)
        return self.engine_api_key


CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache of a started engine on vLLM's CPU build when none is set."""
CPU_STEP_TOKENS = 512
"""Tokens of a started engine's step on vLLM's CPU build when none is set."""
VLLM_STEP_TOKENS = 2048
"""The smallest step vLLM's API server picks on its own (CPUs and most GPUs)."""
PREFILL_CHUNKS = 4
"""A long prompt prefills in chunks of this fraction of a step, by default."""
REPLICA_PROMPT_TOKENS_PER_STEP = 8
"""Default in-flight prompt tokens of one replica, in engine steps (``engine_step_tokens``)."""


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (the ``vllm-cpu`` distribution)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def redis_url_problem(url: str) -> str:
    """What is wrong with a ``redis://HOST:PORT/DB`` URL ('' if nothing)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return f"{url!r} is not a redis:// or rediss:// URL (redis://HOST:PORT/DB)"
    try:
        parts.port  # noqa: B018 (reading it validates it)
    except ValueError:
        return f"{url!r} has no valid port"
    if not parts.hostname:
        return f"{url!r} names no host"
    database = parts.path.removeprefix("/")
    if database and not database.isdigit():
        return f"{url!r}: the database after the host must be a number, not {database!r}"
    return ""


SECRET_SETTINGS = ("engine_api_key", "metrics_token")
"""Settings that are credentials whole: shown only as set or not."""


def masked(value: object) -> str:
    """``value`` as shown to people: a password inside a URL (``scheme://user:PASSWORD@host``)
    replaced by ``***``, in every setting, so ``loraplex config`` and logs leak none."""
    text = str(value)
    if "://" not in text or "@" not in text:
        return text
    return re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", text)


def saved_dtype(model_dir: Path) -> str | None:
    """The dtype a Hugging Face model directory's ``config.json`` says its weights are in
    (``torch_dtype``, or ``dtype`` in newer transformers); None if it says none."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


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
