"""Settings: environment, flags, defaults, and one error naming every bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import config
from server.config import Settings, SettingsError, field_docs, load_settings
from server.engine import engine_command


def test_defaults_are_the_embedded_setup() -> None:
    settings = load_settings(environ={})
    assert settings.home == Path(".loraplex")
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith(".loraplex/registry.db")
    assert settings.resolved_base_model.name == "demo-base"
    assert settings.resolved_served_model_name == "demo-base"


def test_environment_then_flags() -> None:
    env = {"LORAPLEX_PORT": "9000", "LORAPLEX_ENGINE_URLS": "http://a:1, http://b:2"}
    settings = load_settings({"port": "9100", "log_level": None}, environ=env)
    assert settings.port == 9100
    assert settings.engine_urls == ["http://a:1", "http://b:2"]
    assert settings.log_level == "info"


def test_every_problem_is_reported_at_once() -> None:
    env = {
        "LORAPLEX_PORT": "0",
        "LORAPLEX_MAX_LORA_RANK": "12",
        "LORAPLEX_ENGINE_URLS": "ftp://x",
        "LORAPLEX_LOG_LEVEL": "loud",
    }
    with pytest.raises(SettingsError) as info:
        load_settings(environ=env)
    message = str(info.value)
    for name in (
        "LORAPLEX_PORT",
        "LORAPLEX_MAX_LORA_RANK",
        "LORAPLEX_ENGINE_URLS",
        "LORAPLEX_LOG_LEVEL",
    ):
        assert name in message
    assert len(info.value.problems) == 4


def test_unreadable_values_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="LORAPLEX_PORT: cannot read 'eighty'"):
        load_settings(environ={"LORAPLEX_PORT": "eighty"})


def test_every_setting_is_documented() -> None:
    import dataclasses

    docs = field_docs()
    missing = [f.name for f in dataclasses.fields(Settings) if not docs.get(f.name)]
    assert missing == []


def _kv_flag(settings: Settings) -> str | None:
    cmd = engine_command(settings, 9000)
    return (
        cmd[cmd.index("--kv-cache-memory-bytes") + 1] if "--kv-cache-memory-bytes" in cmd else None
    )


def test_started_engines_get_a_fixed_kv_cache_on_the_cpu_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(base_model=Path("/models/base"))
    monkeypatch.setattr(config, "vllm_cpu_build", lambda: True)
    assert _kv_flag(settings) == str(1 << 30)
    assert _kv_flag(Settings(base_model=Path("/m"), engine_kv_cache_bytes=256 << 20)) == str(
        256 << 20
    )
    monkeypatch.setattr(config, "vllm_cpu_build", lambda: False)
    assert _kv_flag(settings) is None  # a GPU build sizes it by engine_memory_fraction
    with pytest.raises(SettingsError, match="LORAPLEX_ENGINE_KV_CACHE_BYTES"):
        Settings(engine_kv_cache_bytes=-1).validate()
