"""Engine discovery: parsing, real lookups (file and DNS) and the add/remove diff."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings, SettingsError
from server.gateway.discovery import Discovery, DiscoveryError, diff


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("dns://loraplex-engine-pods:8000", Discovery("dns", "loraplex-engine-pods", 8000)),
        ("file:///run/engines.txt", Discovery("file", "/run/engines.txt")),
    ],
)
def test_parse(spec: str, expected: Discovery) -> None:
    assert Discovery.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("dns://engines", "needs a name and a port"),
        ("dns://engines:http", "needs a name and a port"),
        ("file://", "names no file"),
        ("http://engine:8000", "neither dns://NAME:PORT nor file:///PATH"),
        ("engines.txt", "neither"),
    ],
)
def test_parse_refuses_with_what_to_write(spec: str, says: str) -> None:
    with pytest.raises(DiscoveryError, match=says):
        Discovery.parse(spec)


async def test_file_lists_urls_without_comments_blanks_or_duplicates(tmp_path: Path) -> None:
    listing = tmp_path / "engines.txt"
    listing.write_text(
        "# engines of base demo\nhttp://127.0.0.1:8101/\n\nhttp://127.0.0.1:8100  # first\n"
        "http://127.0.0.1:8101\n"
    )
    urls = await Discovery.parse(f"file://{listing}").urls()
    assert urls == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]


async def test_missing_file_raises_oserror_so_the_last_list_is_kept(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        await Discovery.parse(f"file://{tmp_path / 'absent.txt'}").urls()


async def test_dns_resolves_every_address_at_the_port() -> None:
    urls = await Discovery.parse("dns://localhost:8123").urls()
    assert "http://127.0.0.1:8123" in urls
    assert all(u.endswith(":8123") for u in urls)


async def test_dns_failure_is_an_oserror() -> None:
    with pytest.raises(OSError):
        await Discovery.parse("dns://no-such-engine.invalid:8000").urls()


def test_diff_keeps_order() -> None:
    change = diff(["http://a:1", "http://b:1"], ["http://b:1", "http://c:1", "http://d:1"])
    assert change.added == ["http://c:1", "http://d:1"]
    assert change.removed == ["http://a:1"]


def test_settings_refuse_discovery_with_fixed_urls_and_bad_specs() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings(engine_urls=["http://a:1"], engine_discovery="dns://x").validate()
    message = str(raised.value)
    assert "engine_urls, not both" in message
    assert "needs a name and a port" in message
    assert Settings(engine_discovery="dns://engines:8000").external_engines
