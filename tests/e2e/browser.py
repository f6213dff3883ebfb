"""Label Studio 1.23.2's own UI, driven in headless Chromium the way the README tells an annotator to use it.

Debian's ``chromium`` (installed by ``make test``) under Playwright for Python, started with
``executable_path``; Playwright's own browser download is never used. The editor's state is read from
``window.Htx`` (regions, suggestions, settings); the smart tools and buttons are found by the classes and test
ids Label Studio gives them.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, Response, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# no sandbox as root; no background traffic (this machine has no network and refuses it)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class LabelingUI:
    """One logged-in browser page on a Label Studio server."""

    def __init__(self, browser: Browser, studio_url: str, artefacts: Path) -> None:
        self.url = studio_url
        self.artefacts = artefacts
        self.page: Page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    # --- artefacts ----------------------------------------------------------------------------------

    def save_artefacts(self, name: str) -> Path:
        """A screenshot and the browser console, for a person to look at after a failure."""
        self.artefacts.mkdir(parents=True, exist_ok=True)
        shot = self.artefacts / f"{name}.png"
        try:
            self.page.screenshot(path=str(shot), full_page=True)
        except Exception as error:  # noqa: BLE001 - the console log is still worth writing
            self.console.append(f"(screenshot failed: {error})")
        (self.artefacts / f"{name}-console.log").write_text("\n".join(self.console) + "\n")
        return shot

    @contextmanager
    def artefacts_on_failure(self, name: str):
        try:
            yield
        except BaseException:
            print(f"browser artefacts: {self.save_artefacts(name)}")
            raise

    # --- pages --------------------------------------------------------------------------------------

    def log_in(self, email: str, password: str) -> None:
        self.page.goto(f"{self.url}/user/login")
        self.page.fill("input[name=email]", email)
        self.page.fill("input[name=password]", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(lambda url: "/user/login" not in url)

    def connect_model(self, project_id: int, title: str, backend_url: str, extra_params: str) -> None:
        """Settings -> Model -> Connect Model, with interactive preannotations on -> Validate and Save."""
        page = self.page
        page.goto(f"{self.url}/projects/{project_id}/settings/ml")
        page.locator("button:has-text('Connect Model')").first.click()
        page.fill("input[name=title]", title)
        page.fill("input[name=url]", backend_url)
        page.fill("textarea[name=extra_params]", extra_params)
        page.locator("input[name=is_interactive]").check(force=True)  # the styled toggle hides the input
        page.locator("button[aria-label='Save machine learning form']").click()
        page.locator("input[name=url]").wait_for(state="detached")  # the form closes once Label Studio saved

    def open_task(self, project_id: int, task_id: int) -> None:
        self.page.goto(f"{self.url}/projects/{project_id}/data?task={task_id}")
        self.page.wait_for_function(
            "() => { const a = window.Htx && window.Htx.annotationStore && window.Htx.annotationStore.selected;"
            " return a && a.objects.length > 0 && a.objects.every(o => o.imageIsLoaded); }", timeout=60_000)

    # --- the editor -----------------------------------------------------------------------------------

    def evaluate(self, script: str):
        return self.page.evaluate(script)

    def keep_label_selected(self) -> None:
        """The editor setting that keeps the label selected after each click (off by default)."""
        if self.evaluate("() => window.Htx.settings.continuousLabeling"):
            return
        self.page.locator("[data-testid=bottombar-settings-button]").click()
        self.page.get_by_text("Keep label selected after creating a region").click()
        self.page.keyboard.press("Escape")
        assert self.evaluate("() => window.Htx.settings.continuousLabeling")

    def auto_annotation(self, on: bool = True) -> None:
        if bool(self.evaluate("() => window.Htx.autoAnnotation")) != on:
            self.page.locator("[data-testid=bottombar-auto-annotation-toggle]").click()
        assert bool(self.evaluate("() => window.Htx.autoAnnotation")) == on

    def active_tools(self) -> list[str]:
        return self.evaluate("() => [...document.querySelectorAll('button.lsf-tool_active')]"
                             ".map(e => (e.getAttribute('aria-label') || '') +"
                             " (e.classList.contains('lsf-tool_smart') ? ' (smart)' : ''))")

    def choose_smart_tool(self, tool: str) -> int:
        """Click Auto-Detect until ``tool`` (``key-point-tool``, ``rectangle-tool``) is the smart tool; clicks.

        (Its hot key M selects the group but, in 1.23.2, never moves past its first tool, the smart brush.)"""
        button = self.page.locator("button.lsf-tool_smart").first
        for presses in range(1, 5):
            button.click()
            if f"{tool} (smart)" in self.active_tools():
                return presses
        raise AssertionError(f"Auto-Detect never selected the smart {tool}: {self.active_tools()}")

    def choose_only_smart_tool(self) -> None:
        """A config with one smart control has one smart tool: the Auto-Detect button is that tool (unnamed)."""
        self.page.locator("button.lsf-tool_smart").first.click()
        assert any(tool.endswith("(smart)") for tool in self.active_tools()), self.active_tools()

    def selected_labels(self) -> dict[str, list[str]]:
        return self.evaluate("() => Object.fromEntries([...window.Htx.annotationStore.selected.names.values()]"
                             ".filter(c => c.selectedLabels).map(c => [c.name, c.selectedLabels.map(l => l.value)]))")

    def store(self) -> dict:
        return self.evaluate("() => { const a = window.Htx.annotationStore.selected; return {"
                             " regions: a.regions.map(r => r.type),"
                             " suggestions: [...a.suggestions.values()].map(r => r.type)}; }")

    def canvas_point(self, fx: float, fy: float) -> tuple[float, float]:
        """A point on the image canvas at fractions of its displayed size."""
        box = self.page.locator(".konvajs-content").first.bounding_box()
        return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy

    def suggestion_ids(self) -> list[str]:
        return self.evaluate("() => [...window.Htx.annotationStore.selected.suggestions.keys()]")

    @contextmanager
    def interactive_call(self):
        """Wraps an action that makes one interactive call; the yielded dict gets the request's context, Label
        Studio's JSON answer, and the ms from the action until a new suggestion is in the editor."""
        call: dict = {}
        before = json.dumps(self.suggestion_ids())
        start = time.perf_counter()
        with self.page.expect_response(lambda r: "/interactive-annotating" in r.url, timeout=30_000) as waiting:
            yield call
        response: Response = waiting.value
        call["context"] = json.loads(response.request.post_data)["context"]
        call["answer"] = response.json()
        if "data" in call["answer"]:  # each answer replaces the suggestion (new region ids)
            self.page.wait_for_function(
                "(before) => { const ids = [...window.Htx.annotationStore.selected.suggestions.keys()];"
                " return ids.length > 0 && JSON.stringify(ids) !== before; }", arg=before, timeout=10_000)
        call["ms"] = (time.perf_counter() - start) * 1000

    def click(self, fx: float, fy: float, negative: bool = False) -> None:
        x, y = self.canvas_point(fx, fy)
        if negative:
            self.page.keyboard.down("Alt")
        try:
            self.page.mouse.click(x, y)
        finally:
            if negative:
                self.page.keyboard.up("Alt")

    def drag(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        (x0, y0), (x1, y1) = self.canvas_point(*start), self.canvas_point(*end)
        self.page.mouse.move(x0, y0)
        self.page.mouse.down()
        self.page.mouse.move(x1, y1, steps=8)
        self.page.mouse.up()

    def accept_suggestions(self) -> None:
        self.page.locator("[data-testid=bottombar-accept-suggestions-button]").click()
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.suggestions.size === 0")

    def submit(self) -> None:
        with self.page.expect_response(lambda r: "/annotations" in r.url and r.request.method == "POST"):
            self.page.locator("[data-testid=bottombar-submit-button]").click()
