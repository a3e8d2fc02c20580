"""Settings: environment, flags, defaults, and one error naming every bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings, SettingsError, field_docs, load_settings


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
