"""Settings: environment, flags, defaults, and one error naming every bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import config
from server.config import Settings, SettingsError, field_docs, load_settings
from server.gateway.engines import engine_command


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


def _flag(settings: Settings, name: str) -> str | None:
    cmd = engine_command(settings, 9000)
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_started_engines_schedule_by_priority_in_short_steps_on_the_cpu_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "vllm_cpu_build", lambda: True)
    settings = Settings(base_model=Path("/m"))
    assert _flag(settings, "--scheduling-policy") == "priority"
    assert _flag(settings, "--max-num-batched-tokens") == "512"
    assert _flag(settings, "--long-prefill-token-threshold") == "128"
    assert settings.resolved_max_in_flight_prompt_tokens() == 8 * 512
    chosen = Settings(base_model=Path("/m"), engine_step_tokens=1024, engine_max_model_len=200)
    assert _flag(chosen, "--max-num-batched-tokens") == "1024"
    assert _flag(chosen, "--long-prefill-token-threshold") == "200"  # vLLM's limit: the context
    chunks = Settings(base_model=Path("/m"), engine_prefill_chunk_tokens=64)
    assert _flag(chunks, "--long-prefill-token-threshold") == "64"
    last = Settings(base_model=Path("/m"), engine_extra_args="--scheduling-policy fcfs")
    assert engine_command(last, 9000)[-2:] == ["--scheduling-policy", "fcfs"]  # vLLM: last wins


def test_on_gpus_vllm_sizes_the_steps_and_prompts_in_flight_are_unbounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "vllm_cpu_build", lambda: False)
    settings = Settings(base_model=Path("/m"))
    assert _flag(settings, "--max-num-batched-tokens") is None
    assert _flag(settings, "--long-prefill-token-threshold") == "512"  # of vLLM's 2,048
    assert settings.resolved_max_in_flight_prompt_tokens() == 0
    assert (
        Settings(engine_max_in_flight_prompt_tokens=9).resolved_max_in_flight_prompt_tokens() == 9
    )
    with pytest.raises(SettingsError, match="LORAPLEX_ENGINE_STEP_TOKENS"):
        Settings(engine_step_tokens=-1).validate()


def test_passwords_inside_urls_are_masked_everywhere_shown() -> None:
    from server.config import masked

    assert masked("postgresql+psycopg://app:s3cr:et@db:5432/x") == (
        "postgresql+psycopg://app:***@db:5432/x"
    )
    assert masked("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert masked("http://user@host/x") == "http://user@host/x"  # a user, no password
    assert masked("sqlite:///home/registry.db") == "sqlite:///home/registry.db"
    assert masked(4) == "4"


def test_loraplex_config_prints_no_credential(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli.main import main

    env = {"LORAPLEX_DATABASE_URL": "postgresql://app:s3cret@db/x",
           "LORAPLEX_REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0",
           "LORAPLEX_METRICS_TOKEN": "tok-123"}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "hunter2" not in out and "tok-123" not in out
    assert "postgresql://app:***@db/x" in out


def test_auto_dtype_is_the_dtype_the_base_was_saved_in(tmp_path: Path) -> None:
    def dtype_of(settings: Settings) -> str:
        cmd = engine_command(settings, 9000)
        return cmd[cmd.index("--dtype") + 1]

    for key, saved in (("dtype", "float32"), ("torch_dtype", "bfloat16")):
        base = tmp_path / f"{key}-{saved}"
        base.mkdir()
        (base / "config.json").write_text(f'{{"{key}": "{saved}"}}')
        assert dtype_of(Settings(base_model=base)) == saved
        assert dtype_of(Settings(base_model=base, engine_dtype="float16")) == "float16"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"torch_dtype": "int8"}')
    assert dtype_of(Settings(base_model=odd)) == "auto"  # vLLM's own choice
    assert dtype_of(Settings(base_model=tmp_path / "missing")) == "auto"
