"""The lifecycle console in a real browser: Playwright drives Debian's Chromium (headless)
against the whole gateway app served by uvicorn on a SQLite registry.

Each change made by clicking is checked in the registry itself (the alias moved) and in
its audit log (named as the signed-in key). A missing browser fails these tests with
what to install; they never skip.

``LORAPLEX_CONSOLE_SCREENSHOTS=docs`` writes the main pages' screenshots there (the
README shows them); otherwise they go to a temporary folder, so the code that takes
them runs every time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry import Registry
from tests.registry.registry_testdata import BASE_NAME, BASE_REVISION, build_tiny_base
from tests.server.console.console_site import (
    JOB_ID,
    LIFECYCLE,
    NEW_BASE,
    STRICT,
    XSS,
    Site,
    open_registry,
    seed,
    serving,
)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = (
    "the console's browser tests need Debian's Chromium at /usr/bin/chromium and the "
    "playwright package: run `make install` as root (deploy/install.sh installs "
    "`apt-get install -y --no-install-recommends chromium chromium-driver`), or install "
    "them yourself; never `playwright install`"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium calls out to Google's hosts at start, which a closed network refuses.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("console")
    build_tiny_base(work / "base")
    registry = open_registry(work)
    tenant_id, tenant_key, actor, admin_key = seed(registry, work)
    with serving(registry, work / "home") as url:
        yield Site(url, registry, tenant_id, tenant_key, actor, admin_key)
    registry.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(INSTALL)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(INSTALL)
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (empty session storage) that fails the test on any script error or
    dialog: an ``alert`` would mean tenant text ran as code."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    tab.set_default_timeout(10_000)
    yield tab
    context.close()
    assert errors == []


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("LORAPLEX_CONSOLE_SCREENSHOTS")
    folder = Path(where) if where else tmp_path_factory.mktemp("shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page: Any, shots: Path, name: str) -> None:
    path = shots / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real render, not a blank page


def sign_in(page: Any, site: Site, key: str | None = None) -> None:
    page.goto(f"{site.url}/console/")
    page.get_by_label("API key").fill(key or site.tenant_key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Adapters").wait_for()


def open_adapter(page: Any, site: Site, name: str) -> None:
    sign_in(page, site)
    page.get_by_role("link", name=name, exact=True).click()
    page.get_by_role("heading", name=f"Adapter {name}").wait_for()


def confirm(page: Any) -> None:
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    dialog.get_by_role("button", name="Confirm").click()
    dialog.wait_for(state="hidden")


def production(registry: Registry, tenant_id: int, name: str) -> int:
    return registry.aliases(tenant_id, name)["production"].version


def last_audit(site: Site, action: str) -> Any:
    events = site.registry.audit_log(tenant_id=site.tenant_id, action=action)
    assert events, f"no {action} in the audit log"
    return events[-1]


def test_the_console_is_served_with_strict_headers_and_no_cdn(site: Site) -> None:
    page = httpx.get(f"{site.url}/console/")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    assert "http" not in page.text.replace("http-equiv", "")  # every asset is the package's own
    script = httpx.get(f"{site.url}/console/console.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "innerHTML" not in script.text
    assert httpx.get(f"{site.url}/console", follow_redirects=False).status_code == 308


def test_sign_in_lists_adapters_and_tenant_text_stays_text(
    site: Site, page: Any, shots: Path
) -> None:
    page.goto(f"{site.url}/console/")
    page.get_by_label("API key").wait_for()
    shoot(page, shots, "sign-in")
    sign_in(page, site)
    assert page.get_by_role("link", name=LIFECYCLE, exact=True).is_visible()
    # The description is shown as its characters; no <img> element came of it.
    assert page.get_by_text(XSS).first.is_visible()
    assert page.locator("#view img").count() == 0
    shoot(page, shots, "adapters")
    # The key lives in this tab's session storage only.
    assert page.evaluate("Object.keys(localStorage).length") == 0
    assert page.evaluate("sessionStorage.getItem('loraplex.console.key')") == site.tenant_key


def test_a_wrong_key_is_refused(site: Site, page: Any) -> None:
    page.goto(f"{site.url}/console/")
    page.get_by_label("API key").fill("lpx-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("status").get_by_text("Sign-in failed").wait_for()
    assert page.get_by_role("navigation").is_hidden()


def test_promote_canary_and_rollback_change_the_registry_as_the_signed_in_key(
    site: Site, page: Any, shots: Path
) -> None:
    registry, tenant = site.registry, site.tenant_id
    open_adapter(page, site, LIFECYCLE)
    assert page.locator("svg.chart circle").count() == 4  # 2 series x 2 versions
    shoot(page, shots, "adapter")

    page.get_by_role("button", name="Promote version 2 to production").click()
    confirm(page)
    page.get_by_role("status").get_by_text("Version 2 of support-bot is in production").wait_for()
    assert production(registry, tenant, LIFECYCLE) == 2
    assert last_audit(site, "adapter.promote").actor == site.tenant_actor

    page.get_by_label("Canary version").select_option("1")
    page.get_by_label("Canary weight (0 to 1)").fill("0.25")
    page.get_by_role("button", name="Set canary weight").click()
    confirm(page)
    page.get_by_role("status").get_by_text("canary of support-bot is version 1").wait_for()
    canary = registry.aliases(tenant, LIFECYCLE)["canary"]
    assert (canary.version, canary.weight) == (1, 0.25)
    assert last_audit(site, "adapter.canary").actor == site.tenant_actor

    page.get_by_role("button", name="Roll back production").click()
    confirm(page)
    page.get_by_role("status").get_by_text("rolled back").wait_for()
    assert production(registry, tenant, LIFECYCLE) == 1
    assert last_audit(site, "adapter.rollback").actor == site.tenant_actor

    # The audit view shows the three changes, named as this key.
    page.get_by_role("link", name="Audit log").click()
    page.get_by_role("heading", name="Audit log").wait_for()
    rows = page.get_by_role("row").filter(has_text=site.tenant_actor)
    rows.filter(has_text="adapter.rolled_back").wait_for()
    assert rows.filter(has_text="adapter.promoted").count() >= 1


def test_a_promote_a_gate_refuses_says_why_and_changes_nothing(site: Site, page: Any) -> None:
    open_adapter(page, site, STRICT)
    page.get_by_role("button", name="Promote version 2 to production").click()
    confirm(page)
    alert = page.locator("#problem")
    alert.wait_for()
    shown = alert.inner_text()
    assert "Promotion refused by a gate" in shown
    assert "qa/accuracy: 0.5 misses the minimum 0.9" in shown  # the failed gate, named
    assert production(site.registry, site.tenant_id, STRICT) == 1


def _tab_to(page: Any, name: str, limit: int = 60) -> None:
    """Press Tab until the focused element's accessible name or text is ``name``."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "(document.activeElement.getAttribute('aria-label') || "
            "document.activeElement.textContent || '').trim()"
        )
        if focused == name:
            return
    raise AssertionError(f"Tab never reached {name!r}")


def test_the_keyboard_alone_reaches_promote_and_its_dialog(site: Site, page: Any) -> None:
    page.goto(f"{site.url}/console/")
    page.get_by_label("API key").wait_for()
    page.keyboard.type(site.tenant_key)  # the key field has focus on arrival
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Adapters").wait_for()
    _tab_to(page, STRICT)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name=f"Adapter {STRICT}").wait_for()
    _tab_to(page, "Promote version 2 to production")
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    assert page.evaluate("document.activeElement.id") == "confirm-cancel"
    page.keyboard.press("Escape")  # closes it, and changes nothing
    dialog.wait_for(state="hidden")
    page.get_by_role("status").get_by_text("Cancelled").wait_for()
    _tab_to(page, "Promote version 2 to production")
    page.keyboard.press("Space")
    dialog.wait_for()
    page.keyboard.press("Tab")  # from Cancel to Confirm
    page.keyboard.press("Enter")
    page.locator("#problem").wait_for()  # the gate refuses it
    assert production(site.registry, site.tenant_id, STRICT) == 1


def test_jobs_show_their_loss_curve_and_events(site: Site, page: Any, shots: Path) -> None:
    sign_in(page, site)
    page.get_by_role("link", name="Fine-tuning jobs").click()
    page.get_by_role("heading", name="Fine-tuning jobs").wait_for()
    page.get_by_role("link", name=JOB_ID).click()
    page.get_by_role("heading", name=f"Job {JOB_ID}").wait_for()
    chart = page.locator("svg.chart")
    assert chart.locator("polyline").count() == 2  # training and validation loss
    assert chart.locator("circle").count() == 20 + 4
    assert page.get_by_role("cell", name="Job succeeded").is_visible()
    shoot(page, shots, "job")


def test_retraining_loops_are_listed(site: Site, page: Any) -> None:
    sign_in(page, site)
    page.get_by_role("link", name="Retraining loops").click()
    page.get_by_role("heading", name="Retraining loops").wait_for()
    row = page.get_by_role("row").filter(has_text="every")
    row.wait_for()
    assert "every 86400 s" in row.inner_text()
    row.get_by_role("link", name=LIFECYCLE).click()  # to the adapter it retrains
    page.get_by_role("heading", name=f"Adapter {LIFECYCLE}").wait_for()


def test_base_upgrades_show_each_adapter_they_move(site: Site, page: Any, shots: Path) -> None:
    sign_in(page, site)
    page.get_by_role("link", name="Base upgrades").click()
    title = f"{BASE_NAME}@{BASE_REVISION} → {NEW_BASE}@{BASE_REVISION}: running"
    page.get_by_role("heading", name=title).wait_for()
    rows = page.get_by_role("row").filter(has_text="acme")
    assert rows.count() == 2  # support-bot and strict-bot, each at its production version
    for adapter in (LIFECYCLE, STRICT):
        row = rows.filter(has_text=adapter).inner_text()
        assert "planned" in row and "no training job to retrain from" in row  # and why
    shoot(page, shots, "upgrades")


def test_usage_is_charted_over_time(site: Site, page: Any, shots: Path) -> None:
    sign_in(page, site)
    page.get_by_role("link", name="Usage").click()
    page.get_by_role("heading", name="Usage").wait_for()
    charts = page.locator("svg.chart")
    assert charts.count() == 2
    by_version = charts.first
    assert by_version.locator("polyline").count() == 2  # v1, and the canary's v2
    assert by_version.locator("circle").count() == 14 + 5  # one a day each
    assert charts.nth(1).locator("circle").count() == 14
    shoot(page, shots, "usage")


def test_an_admin_key_picks_a_tenant_and_reads_the_audit_log(site: Site, page: Any) -> None:
    page.goto(f"{site.url}/console/")
    page.get_by_label("API key").fill(site.admin_key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_label("Tenant").select_option("acme")
    page.get_by_role("link", name=STRICT, exact=True).wait_for()
    page.get_by_role("link", name="Audit log").click()
    page.get_by_role("heading", name="Audit log").wait_for()
    page.get_by_role("row").filter(has_text="adapter.gates").first.wait_for()
    page.get_by_role("link", name="Base upgrades").click()  # the operator's side of them
    page.get_by_role("heading", name="Base upgrades").wait_for()
    assert page.get_by_role("row").filter(has_text="acme").count() == 2
