"""A real browser at /docs: Debian's Chromium driven by Playwright, as a reviewer uses Swagger UI.

Against the real OpenID provider (tests/oidc): Authorize (authorization code + PKCE, in the popup the
provider opens) → log in as bob → list pending requests (Try it out / Execute) → read the answer →
approve → Logout → carol logs in (the provider asks again: `prompt=login`) and gives the second approval.
In dev mode: Authorize opens the dev login page (`/dev/auth`), and the token it yields lists requests.

Every request the browser makes is watched: none may leave 127.0.0.1 (others are aborted and counted),
and no page may report a Content-Security-Policy violation. Screenshots of each step are kept under
var/artifacts/browser/<test>/ (the path is printed).

Without Chromium (`apt-get install chromium`, at /usr/bin/chromium or TLSO_CHROMIUM) or the `playwright`
package the tests skip, unless TLSO_REQUIRE_BROWSER=1 (CI), which makes that a failure. Playwright never
downloads a browser here: it drives the system Chromium through `executable_path`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy.engine import Engine

from app.core.config import DEFAULT_ROLE_MAP
from app.core.devidp import DevIdentityProvider
from app.main import create_app
from tests.helpers import VALID_REQUEST, LiveServer, free_port, make_settings
from tests.oidc.fixtures import require_oidc_provider, run_oidc_provider

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("TLSO_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "var" / "artifacts" / "browser"
LOOPBACK = "127.0.0.1"
TIMEOUT_MS = 15_000


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _require_browser() -> None:
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the `playwright` package is not installed (pip install -e '.[test]')"
    if problem is None and not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if problem is not None:
        if os.environ.get("TLSO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TLSO_REQUIRE_BROWSER=1 but {problem}", pytrace=False)
        pytest.skip(problem)


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname == LOOPBACK


class Watch:
    """Everything the browser asks for, in every page and popup of one context."""

    def __init__(self, context: Any) -> None:
        self.requests: list[str] = []
        self.outside: list[str] = []
        self.csp: list[str] = []
        self.page_errors: list[str] = []
        context.route("**/*", self._route)
        context.on("request", lambda request: self.requests.append(request.url))
        context.on("console", self._console)
        context.on("weberror", lambda error: self.page_errors.append(str(error.error)))

    def _route(self, route: Any) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("http", "https", "ws", "wss") and not _loopback(url):
            self.outside.append(url)
            route.abort()
            return
        route.continue_()

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            self.csp.append(message.text)

    def assert_clean(self) -> None:
        assert self.requests, "the browser made no request at all"
        leaving = [
            url for url in self.requests if urlsplit(url).scheme != "data" and urlsplit(url).hostname != LOOPBACK
        ]
        assert self.outside == [] and leaving == [], f"requests beyond {LOOPBACK}: {self.outside or leaving}"
        assert self.csp == [], f"Content-Security-Policy violations: {self.csp}"
        assert self.page_errors == [], f"uncaught errors in the pages: {self.page_errors}"


class SwaggerUI:
    """The steps a person takes in Swagger UI, each followed by a screenshot."""

    def __init__(self, page: Any, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.step = 0

    def shot(self, name: str, page: Any = None) -> None:
        self.step += 1
        (page or self.page).screenshot(path=str(self.shots / f"{self.step:02d}-{name}.png"), full_page=False)

    def open(self, base: str) -> None:
        self.page.goto(f"{base}/docs")
        self.page.locator(".swagger-ui .information-container").wait_for()
        self.shot("docs")

    def _dialog(self) -> Any:
        self.page.locator("button.btn.authorize").first.click()
        return self.page.locator(".modal-ux")

    def log_in(self, fill_login_page: Any, who: str) -> Any:
        """Authorize → the provider's page in a popup → back in Swagger UI as "Authorized"; returns the popup's page."""
        dialog = self._dialog()
        with self.page.expect_popup() as popup_info:
            dialog.get_by_role("button", name="Apply given OAuth2 credentials").click()
        popup = popup_info.value
        try:
            popup.wait_for_load_state()
        except Exception as exc:  # the popup closed at once: the provider logged someone in without asking
            raise AssertionError(f"the provider's session logged someone in without asking for {who}") from exc
        self.shot(f"login-page-{who}", popup)
        with popup.expect_event("close"):
            fill_login_page(popup)
        dialog.get_by_role("button", name="Remove authorization").wait_for()
        self.shot(f"authorized-{who}")
        dialog.locator("button.btn-done").first.click()
        return popup

    def log_out(self) -> None:
        dialog = self._dialog()
        dialog.get_by_role("button", name="Remove authorization").click()
        dialog.get_by_role("button", name="Apply given OAuth2 credentials").wait_for()
        self.shot("logged-out")
        dialog.locator("button.btn-done").first.click()

    def execute(
        self, operation_id: str, name: str, *, params: dict[str, str] | None = None, body: str | None = None
    ) -> tuple[int, Any]:
        """Try it out → fill in → Execute; the answer as Swagger UI shows it (status, parsed JSON)."""
        from playwright.sync_api import expect

        op = self.page.locator(f"#operations-overrides-{operation_id}")
        if not op.locator(".opblock-body").is_visible():
            op.locator(".opblock-summary").first.click()
        # Swagger UI renders the body after the click: wait for its toggle rather than count what is there yet
        # (a count taken too early found no "Try it out", skipped it, and left the inputs disabled).
        toggle = op.locator("button.try-out__btn").first  # "Try it out", or "Cancel" (then "Reset")
        toggle.wait_for()
        if "cancel" not in toggle.inner_text().lower():
            toggle.click()
        expect(toggle).to_have_text(re.compile("Cancel", re.IGNORECASE))
        for param, value in (params or {}).items():
            row = op.locator(f'tr[data-param-name="{param}"]')
            if row.locator("select").count():
                row.locator("select").select_option(value)
            else:
                row.locator("input").fill(value)
        if body is not None:
            op.locator("textarea.body-param__text").fill(body)
        clear = op.locator("button.btn-clear")
        if clear.count():
            clear.click()
        op.locator("button.execute").click()
        status = op.locator(".live-responses-table .response .response-col_status").first
        expect(status).to_have_text(re.compile(r"\d{3}"))
        code = op.locator(".live-responses-table .response-col_description .microlight").first
        code.wait_for()
        status.scroll_into_view_if_needed()
        self.shot(name)
        return int(status.inner_text().strip()), json.loads(code.inner_text())


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the module (each test has a context of its own)."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_context(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], chromium: Any
) -> Iterator[tuple[Any, Path]]:
    shots = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with capsys.disabled():
        print(f"\nbrowser screenshots: {shots}")
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context, shots
    finally:
        context.close()


@contextmanager
def _dev_mode(engine: Engine) -> Iterator[str]:
    """The API in dev mode (its own identity provider under /dev) on a free loopback port: its base URL."""
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    idp = DevIdentityProvider(f"{base}/dev")
    with LiveServer(create_app(make_settings(oidc_issuer=idp.issuer), engine=engine, dev_idp=idp), port=port):
        yield base


def _create(base: str, token: str, **fields: Any) -> dict[str, Any]:
    answer = httpx.post(
        f"{base}/v1/overrides", json={**VALID_REQUEST, **fields}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


def _check_listed(page: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    [item] = [item for item in page["items"] if item["id"] == override["id"]]
    assert item["destination"] == override["destination"] and item["state"] == "pending"
    # What a reviewer reads first: the summary line with what mail loses under the requested policy.
    assert next(iter(item)) == "summary" and item["summary"]["line"].startswith(override["policy"]), item
    return item


def test_a_reviewer_logs_in_lists_approves_and_the_next_reviewer_logs_in_after_logout(
    engine: Engine, browser_context: tuple[Any, Path]
) -> None:
    require_oidc_provider()
    context, shots = browser_context
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    with run_oidc_provider(redirect_uris=[f"{base}/docs/oauth2-redirect"], log_dir=shots) as provider:
        settings = make_settings(
            oidc_issuer=provider.issuer,
            oidc_audience=provider.audience,
            oidc_roles_claim="groups",
            oidc_role_map=DEFAULT_ROLE_MAP,
            oidc_algorithms=["RS256", "ES256"],
        )
        with LiveServer(create_app(settings, engine=engine), port=port):
            # alice asks for `none` on a domain: that needs two reviewers.
            override = _create(base, provider.user_token("alice"), destination="broken-dane.example", policy="none")
            watch = Watch(context)
            ui = SwaggerUI(context.new_page(), shots)
            ui.open(base)

            def provider_login(name: str) -> Any:
                def fill(popup: Any) -> None:
                    popup.locator("input[name=login]").fill(name)
                    popup.locator("input[name=password]").fill("any")
                    popup.locator("[type=submit]").first.click()

                return fill

            ui.log_in(provider_login("bob"), "bob")
            status, page = ui.execute(
                "list_overrides_v1_overrides_get", "bob-lists-pending", params={"state": "pending"}
            )
            assert status == 200, page
            _check_listed(page, override)

            approve = "approve_override_v1_overrides__override_id__approve_post"
            comment = json.dumps({"comment": "Diagnosis checked: TLSA stale since the renewal."})
            status, approved = ui.execute(
                approve, "bob-approves", params={"override_id": str(override["id"])}, body=comment
            )
            assert status == 200, approved
            assert [a["reviewer"] for a in approved["approvals"]] == ["bob"] and approved["state"] == "pending"

            # After Swagger's logout the provider asks who logs in next (prompt=login): its session does not
            # log bob back in. Filling its login form is that proof; carol's approval counts as a second person's.
            ui.log_out()
            ui.log_in(provider_login("carol"), "carol")
            status, page = ui.execute("list_overrides_v1_overrides_get", "carol-lists-pending")
            assert status == 200
            status, approved = ui.execute(
                approve, "carol-approves", params={"override_id": str(override["id"])}, body=comment
            )
            assert status == 200, approved
            assert [a["reviewer"] for a in approved["approvals"]] == ["bob", "carol"]
            assert approved["state"] == "approved"
            watch.assert_clean()


def test_dev_mode_authorize_opens_the_dev_login_page_and_its_token_works(
    engine: Engine, browser_context: tuple[Any, Path]
) -> None:
    context, shots = browser_context
    with _dev_mode(engine) as base:
        alice = httpx.post(f"{base}/dev/token", json={"sub": "alice", "roles": ["requester"]}).json()
        override = _create(base, alice["access_token"], destination="stale-tlsa.example")
        watch = Watch(context)
        ui = SwaggerUI(context.new_page(), shots)
        ui.open(base)

        def dev_login(popup: Any) -> None:
            assert popup.url.startswith(f"{base}/dev/auth?")
            popup.locator("input[name=sub]").fill("bob")
            popup.locator("input[value=requester]").uncheck()
            popup.locator("input[value=approver]").check()
            popup.get_by_role("button", name="Log in").click()

        ui.log_in(dev_login, "bob")
        status, page = ui.execute("list_overrides_v1_overrides_get", "bob-lists-pending", params={"state": "pending"})
        assert status == 200, page
        _check_listed(page, override)  # an approver sees alice's request: the token carries bob's roles
        watch.assert_clean()


def test_the_watch_sees_a_request_beyond_loopback_and_a_csp_violation(
    engine: Engine, browser_context: tuple[Any, Path]
) -> None:
    """The two guards of the tests above can fail: a blocked fetch and a navigation away are both caught."""
    context, _ = browser_context
    with _dev_mode(engine) as base:
        watch = Watch(context)
        page = context.new_page()
        page.goto(f"{base}/docs")
        with page.expect_console_message(lambda message: "Content Security Policy" in message.text):
            page.evaluate("() => fetch('https://example.com/x').catch(() => null)")  # connect-src refuses it
        assert watch.csp and watch.outside == []
        with pytest.raises(Exception, match="ERR_FAILED"):
            page.goto("https://example.com/")  # aborted by the route: it never leaves the machine
        assert watch.outside == ["https://example.com/"]
        with pytest.raises(AssertionError, match=r"beyond 127\.0\.0\.1"):
            watch.assert_clean()
