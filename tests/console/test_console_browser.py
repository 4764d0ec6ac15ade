"""The console in a real browser (Debian's chromium driven by Playwright) against a real
server: the admin app with the console served by uvicorn on 127.0.0.1, a real SQLite
registry, the rollout runner over a recording ``AssignPort`` (stepped by the test on a fake
clock, as its leader thread would).

An admin creates a viewer account and the viewer, logged in, sees no write button; an
operator revokes a device; a release manager publishes a signed bundle by file upload (the
console's script posts it to the API). An operator logs in, finds a device, starts a
rollout, watches it progress and halt on a gate (the live view polls), aborts it and finds
it in the audit log; a viewer cannot write (no buttons; forged requests to the console and
the API are refused); CSRF (a wrong token, a cross-site form) and XSS (markup in
device-supplied text) attempts fail in the browser.

One browser and one server per module. Chromium is installed by ``scripts/setup.sh``; without
it these tests fail (they never skip).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from console_world import PASSWORD, ConsoleWorld
from playwright.sync_api import Browser, Page, expect, sync_playwright

from bundles import DigitsBundles
from edge_agent.wire.telemetry import Event
from fleet_server.admin.api import AdminServer
from fleet_server.rollouts.policy import RolloutPolicy, Selector

CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)  # the live view polls every 2 s; the machine is shared


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (bash scripts/setup.sh)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, digits_bundles: DigitsBundles
) -> Iterator[tuple[ConsoleWorld, str]]:
    world = ConsoleWorld.open(tmp_path_factory.mktemp("console"), keys=digits_bundles.keys)
    world.registry.enroll("dev-spare", group="spare")
    for i in range(6):
        world.registry.enroll(f"dev-{i}", group="line-3", tags={"site": "a"})
        world.install(f"dev-{i}", 1, 1)
    world.registry.enroll("dev-hostile", group=HOSTILE, tags={HOSTILE: HOSTILE})
    world.registry.ingest("dev-hostile", [Event("dev-hostile", 1, "install_failed", 5.0,
                                                detail=HOSTILE)])  # fmt: skip
    for v in (1, 2, 3):
        world.registry.publish_bundle("digits", v, channel="stable", sha256=f"{v}" * 64,
                                      length=10, targets_sha256=f"{v + 3}" * 64)  # fmt: skip
    server = AdminServer(world.app(), "127.0.0.1", 0)
    server.start()
    try:
        yield world, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        world.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context; no page may break the Content-Security-Policy (an inline
    script or style the console needed would show up here)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield p
    context.close()
    violations = [e for e in errors if "Content Security Policy" in e]
    assert not violations, violations


def log_in(page: Page, base: str, name: str) -> None:
    page.goto(f"{base}/console/")
    expect(page).to_have_url(f"{base}/console/login?next=/console/")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Fleet overview")


def csrf_of(page: Page) -> str:
    value = page.locator("header input[name=csrf_token]").get_attribute("value")
    assert value
    return value


def test_operator_runs_a_rollout_that_halts_on_a_gate_and_aborts_it(
    page: Page, served: tuple[ConsoleWorld, str]
) -> None:
    world, base = served
    log_in(page, base, "rel")
    # Find a device.
    page.click("nav >> text=Devices")
    page.fill("input[name=group]", "line-3")
    page.click("form.filters button")
    expect(page.locator("#device-list")).to_contain_text("6 device(s)")
    page.click("#device-list >> text=dev-2")
    expect(page.locator("h1")).to_contain_text("Device dev-2")
    expect(page.locator("main")).to_contain_text("line-3")
    # Start a rollout with the policy form.
    page.click("nav >> text=Rollouts")
    form = page.locator("#create-rollout")
    form.locator("input[name=model]").fill("digits")
    form.locator("input[name=version]").fill("2")
    form.locator("input[name=selector]").fill("line-3")
    form.locator("input[name=canary_count]").fill("2")
    form.locator("input[name=steps]").fill("0.5, 1")
    form.locator("input[name=dwell_seconds]").fill("60")
    form.locator("input[name=min_devices]").fill("2")
    form.locator("input[name=min_requests]").fill("10")
    form.locator("select[name=on_breach]").select_option("pause")
    form.locator("button[type=submit]").click()
    expect(page.locator("h1")).to_contain_text("Rollout ro")
    [rollout] = [r for r in world.runner.rollouts() if r.to_version == 2]
    expect(page.locator("#rollout-state")).to_have_text("pending")
    # The runner's leader steps it: canaries assigned; the live view picks it up by polling.
    [decision] = world.runner.step()
    canaries = sorted(decision.assign)
    expect(page.locator("#rollout-state")).to_have_text("dwelling")
    expect(page.locator("#live")).to_contain_text("assigned 2")
    # One canary rolls back on its own: the rollback gate breaches and the rollout pauses.
    world.install(canaries[0], 1, 2, outcome="rolled_back")
    world.install(canaries[1], 2, 2)
    world.runner.step()
    expect(page.locator("#rollout-state")).to_have_text("paused")
    breached = page.locator("#live tr", has_text="device_rollbacks").first
    expect(breached).to_contain_text("breach")
    expect(page.locator("#live")).to_contain_text("gate breached")
    # Abort from the live view (htmx, after a confirmation).
    page.once("dialog", lambda d: d.accept())
    page.click("#cmd-abort")
    expect(page.locator("#rollout-state")).to_have_text("aborted")
    assert world.runner.get(rollout.id).state == "aborted"
    assert page.locator("#live").get_attribute("hx-trigger") is None  # final: polling stops
    # The audit log has it, with the account as the actor.
    page.click("nav >> text=Audit")
    row = page.locator("#audit tr", has_text="POST /v1/rollouts/{rollout_id}/abort").first
    expect(row).to_contain_text("session:rel")
    expect(row).to_contain_text(f"rollout:{rollout.id}")
    expect(page.locator("#audit")).to_contain_text("POST /v1/rollouts")


def _post_status(page: Page, url: str, headers: dict[str, str], body: str = "") -> int:
    return int(
        page.evaluate(
            """async ([url, headers, body]) => (await fetch(url, {method: "POST", headers,
                 body, redirect: "manual"})).status""",
            [url, headers, body],
        )
    )


def test_a_viewer_cannot_write_in_the_browser_nor_through_the_api(
    page: Page, served: tuple[ConsoleWorld, str]
) -> None:
    world, base = served
    r = world.runner.create("digits", 3, selector=Selector(group="line-3"),
                            policy=RolloutPolicy(canary_count=1, min_devices=1))  # fmt: skip
    try:
        log_in(page, base, "viv")
        page.goto(f"{base}/console/rollouts")
        expect(page.locator("#create-rollout")).to_have_count(0)
        page.goto(f"{base}/console/rollouts/{r.id}")
        expect(page.locator("#rollout-state")).to_have_text("pending")
        expect(page.locator("[id^=cmd-]")).to_have_count(0)
        page.goto(f"{base}/console/devices/dev-1")
        expect(page.locator("text=Revoke device")).to_have_count(0)
        csrf = csrf_of(page)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        console = f"{base}/console/rollouts/{r.id}/abort"
        assert _post_status(page, console, form, f"csrf_token={csrf}") == 403
        assert _post_status(page, f"{base}/v1/rollouts/{r.id}/abort", {"X-CSRF-Token": csrf}) == 403
        assert _post_status(page, f"{base}/console/devices/dev-1/revoke", form,
                            f"csrf_token={csrf}") == 403  # fmt: skip
        assert world.runner.get(r.id).state == "pending"
        assert not world.registry.get_device("dev-1").revoked
    finally:
        world.runner.abort(r.id)


def test_csrf_attempts_fail_in_the_browser(page: Page, served: tuple[ConsoleWorld, str]) -> None:
    world, base = served
    r = world.runner.create("digits", 3, selector=Selector(group="line-3"),
                            policy=RolloutPolicy(canary_count=1, min_devices=1),
                            override_aborted="second try")  # fmt: skip
    try:
        log_in(page, base, "ada")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        url = f"{base}/console/rollouts/{r.id}/pause"
        assert _post_status(page, url, form, "csrf_token=wrong") == 403
        assert _post_status(page, url, form, "") == 403
        assert world.runner.get(r.id).state == "pending"
        # A cross-site page that posts the right form (even with the right token, which it
        # cannot know): the SameSite=Strict cookie is not sent, the console asks for a login.
        csrf = csrf_of(page)
        attack = "http://attacker.example/page"
        page.route(attack, lambda route: route.fulfill(
            content_type="text/html",
            body=f'<form id="f" method="post" action="{url}">'
                 f'<input name="csrf_token" value="{csrf}"></form>',
        ))  # fmt: skip
        page.goto(attack)
        page.locator("#f").evaluate("f => f.submit()")
        expect(page.locator("input[name=password]")).to_be_visible()
        assert world.runner.get(r.id).state == "pending"
    finally:
        world.runner.abort(r.id)


def test_markup_in_device_text_is_shown_as_text_and_never_runs(
    page: Page, served: tuple[ConsoleWorld, str]
) -> None:
    _, base = served
    log_in(page, base, "ops")
    for url in (f"{base}/console/devices", f"{base}/console/devices/dev-hostile",
                f"{base}/console/"):  # fmt: skip
        page.goto(url)
        expect(page.locator("main")).to_contain_text(HOSTILE)
        assert page.locator("main img[src=x]").count() == 0
        assert page.locator("main script").count() == 0
        assert page.evaluate("() => window.__xss === undefined")


def log_out(page: Page) -> None:
    page.click("header button:has-text('Log out')")
    expect(page.locator("input[name=password]")).to_be_visible()


def test_an_admin_creates_a_viewer_who_sees_no_write_button(
    page: Page, served: tuple[ConsoleWorld, str]
) -> None:
    world, base = served
    log_in(page, base, "ada")
    page.click("nav >> text=Accounts")
    form = page.locator("#create-account")
    form.locator("input[name=name]").fill("vera")
    form.locator("select[name=role]").select_option("viewer")
    form.locator("input[name=password]").fill(PASSWORD)
    form.locator("button[type=submit]").click()
    expect(page.locator("#account-vera")).to_contain_text("viewer")
    assert world.accounts.show("vera").role == "viewer"
    log_out(page)
    log_in(page, base, "vera")
    expect(page.locator("nav >> text=Accounts")).to_have_count(0)
    for path, absent in (
        ("/console/rollouts", "#create-rollout"),
        ("/console/models", "#publish-model"),
        ("/console/devices/dev-1", "text=Revoke device"),
        ("/console/devices/dev-1", "#set-label"),
        ("/console/devices/dev-1", "[id^=diag-]"),
    ):
        page.goto(f"{base}{path}")
        expect(page.locator("main h1")).to_be_visible()
        expect(page.locator(absent)).to_have_count(0)
    page.click("header a.me")
    expect(page.locator("h1")).to_contain_text("My account: vera")


def test_an_operator_revokes_a_device(page: Page, served: tuple[ConsoleWorld, str]) -> None:
    world, base = served
    log_in(page, base, "ops")
    page.goto(f"{base}/console/devices/dev-spare")
    page.on("dialog", lambda d: d.accept())
    page.click("text=Revoke device")
    expect(page.locator("h1 .badge")).to_have_text("revoked")
    expect(page.locator("text=Revoke device")).to_have_count(0)
    assert world.registry.get_device("dev-spare").revoked
    page.click("nav >> text=Audit")
    row = page.locator("#audit tr", has_text="POST /v1/devices/{device_id}/revoke").first
    expect(row).to_contain_text("session:ops")


def test_a_release_manager_publishes_a_bundle_by_upload(
    page: Page, served: tuple[ConsoleWorld, str], digits_bundles: DigitsBundles
) -> None:
    world, base = served
    log_in(page, base, "rel")
    page.click("nav >> text=Models")
    upload = page.locator("#publish-model input[type=file]")
    upload.set_input_files(
        {"name": "junk.efb", "mimeType": "application/octet-stream", "buffer": b"not a bundle"}
    )
    page.click("#publish-model button[type=submit]")
    expect(page.locator("#publish-status")).to_contain_text("publish failed (4")
    upload.set_input_files(str(digits_bundles.path(5, "narrow")))
    page.click("#publish-model button[type=submit]")
    expect(page.locator("main")).to_contain_text("digits v5")
    assert ("digits", 5) in [(b.name, b.version) for b in world.service.list_models()]
    page.click("nav >> text=Audit")
    row = page.locator("#audit tr", has_text="POST /v1/models").first
    expect(row).to_contain_text("session:rel")
