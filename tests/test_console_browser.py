"""The console in a real headless Chromium (Debian's, driven by Selenium through its
ChromeDriver; tests/tools/browser-up.sh installs both), against llmswap serving fake backends.

Each view's screenshot goes to docs/ (the README shows them).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from twisted.internet.defer import inlineCallbacks

from tests.fakebackend import live_processes
from tests.support import HI, wait_for
from tests.test_console import ADMIN
from tests.test_daemon import DaemonTestCase

DOCS = Path(__file__).resolve().parent.parent / "docs"
WAIT = 20  # seconds a browser step may take at most


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='llmswap-chromium-')}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def backend_running(name: str) -> bool:
    """A fake backend of that name is a live process (read from /proc, not from llmswap)."""
    return any(b"--name" in argv and name.encode() in argv for _, _, argv in live_processes())


@pytest.mark.browser
class ConsoleBrowserTests(DaemonTestCase):
    timeout = 180

    def setUp(self) -> None:
        super().setUp()
        self.driver: webdriver.Chrome | None = None

    def tearDown(self) -> None:
        if self.driver is not None:
            self.driver.quit()  # 0.3 s; run from the client threads it was never picked up

    def browse(self, step: Callable[[webdriver.Chrome], Any]) -> Any:
        """Run a blocking browser step in a thread: the daemon it talks to runs on this reactor."""
        return self.in_thread(step, self.driver)

    def until(self, condition: Callable[[webdriver.Chrome], Any]) -> Any:
        """Wait for ``condition``; an element the live view rebuilt while it was read is read
        again, not an error."""
        stale = (StaleElementReferenceException,)
        return self.browse(
            lambda d: WebDriverWait(d, WAIT, ignored_exceptions=stale).until(condition)
        )

    def cell(self, model: str, column: int) -> Callable[[webdriver.Chrome], str]:
        def text(d: webdriver.Chrome) -> str:
            rows = d.find_elements(By.CSS_SELECTOR, f'#model-rows tr[data-model="{model}"] td')
            return rows[column].text if rows else ""

        return text

    def click(self, selector: str) -> Any:
        """Click it, again if the live view rebuilt it meanwhile."""

        def clicked(d: webdriver.Chrome) -> bool:
            d.find_element(By.CSS_SELECTOR, selector).click()
            return True

        return self.until(clicked)

    def tab(self, name: str) -> Any:
        return self.browse(
            lambda d: d.find_element(By.CSS_SELECTOR, f'#tabs [data-view="{name}"]').click()
        )

    def shot(self, name: str) -> Any:
        return self.browse(lambda d: d.save_screenshot(str(DOCS / f"console-{name}.png")))

    @inlineCallbacks
    def test_every_view_live_in_a_real_browser(self) -> Any:
        self.start(
            {"chat": self.fake("chat", startup_delay=1.5), "coder": self.fake("coder", ttl=600)},
            devices={"ram": {"memory": "24GiB", "probe": "ram"}},
            state_dir=os.path.abspath(self.mktemp()),
            pools={"assistant": {"models": ["coder", "chat"]}},
        )
        self.driver = yield self.in_thread(chromium)
        yield self.browse(lambda d: d.get(self.daemon.url + "/"))  # a browser: sent to /ui/
        yield self.until(lambda d: d.find_element(By.ID, "link").text == "live")
        self.assertTrue((yield self.browse(lambda d: d.current_url.endswith("/ui/"))))
        self.assertEqual((yield self.browse(self.cell("chat", 1))), "stopped")

        # A request for a stopped model: starting, then ready, without reloading the page.
        first = self.chat("chat")
        yield self.until(lambda d: self.cell("chat", 1)(d).startswith("starting"))
        loading = yield self.browse(self.cell("chat", 3))
        self.assertIn("loading for", loading)
        yield self.until(lambda d: self.cell("chat", 1)(d).startswith("ready"))
        yield first
        # The pool: its members, the loaded one serving it.
        serving = '#pools [data-pool="assistant"] .serving'
        yield self.until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, serving)]
                         == ["chat"])  # fmt: skip
        pool = yield self.browse(lambda d: d.find_element(By.ID, "pools").text)
        self.assertEqual(pool, "pool assistant (prefers loaded): coder, chat")

        # A request waits while chat's only slot is busy: the queue shows it, with its position.
        busy = self.post("/v1/chat/completions", {"model": "chat", "fake_sleep": 2.5})
        yield wait_for(lambda: self.daemon.service.health()["in_flight"] == 1)
        waiting = self.chat("coder")
        yield self.tab("queue")
        yield self.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#queue-rows tr"))
        row = yield self.browse(
            lambda d: [td.text for td in d.find_elements(By.CSS_SELECTOR, "#queue-rows td")]
        )
        self.assertEqual(row[:3], ["1", "coder", "-"])
        yield self.shot("queue")
        yield busy
        yield waiting

        # Activity: the finished requests with their tokens.
        yield self.tab("activity")
        yield self.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#activity-rows tr")) >= 3)
        cells = yield self.browse(
            lambda d: [
                td.text
                for td in d.find_elements(By.CSS_SELECTOR, "#activity-rows tr:first-child td")
            ]
        )
        self.assertEqual(cells[1:5], ["chat", "coder", "-", "200"])
        self.assertEqual(cells[8:10], ["3", "3"])  # prompt and completion tokens, from usage
        yield self.shot("activity")

        # Models: Unload stops the backend (checked on the real process list).
        yield self.tab("models")
        yield self.until(lambda d: self.cell("coder", 1)(d).startswith("ready"))
        self.assertTrue(backend_running("coder"))
        yield self.click('button[data-model="coder"]')
        yield self.until(lambda d: self.cell("coder", 1)(d).startswith("stopped"))
        self.assertFalse(backend_running("coder"))
        yield self.chat("chat")
        yield self.until(lambda d: self.cell("chat", 1)(d).startswith("ready"))
        # Measured memory: each loaded model's peak, and what the probed device really holds.
        # Each model's linger, learned: coder lingered (or not) while chat waited for it.
        linger = yield self.browse(self.cell("coder", 3))
        self.assertRegex(linger, r"(lingers [\d.]+ ?m?s|no linger)( · paid \d+ of \d+)?$")
        yield self.until(lambda d: "measured" in self.cell("chat", 2)(d))
        self.assertRegex((yield self.browse(self.cell("chat", 2))), r"measured \d+ MiB")
        budgets = yield self.browse(lambda d: d.find_element(By.ID, "budgets").text)
        self.assertRegex(budgets, r"counted; measured in use: \d+\.\d of \d+\.\d GiB")

        def memory_points(d: webdriver.Chrome) -> int:  # the device's use over time, charted
            lines = d.find_elements(
                By.CSS_SELECTOR, '#budgets svg.memory[data-device="ram"] polyline'
            )
            return len((lines[0].get_attribute("points") or "").split()) if lines else 0

        yield self.until(lambda d: memory_points(d) >= 2)
        yield self.shot("models")

        yield self.tab("swaps")
        yield self.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart rect")) >= 2)
        causes = yield self.browse(
            lambda d: [
                r.find_elements(By.TAG_NAME, "td")[1].text
                for r in d.find_elements(By.CSS_SELECTOR, "#swap-rows tr")
            ]
        )
        self.assertIn("admin", causes)
        self.assertIn("request", causes)
        yield self.shot("swaps")

        # Logs: what the backend printed, live.
        yield self.tab("logs")
        yield self.browse(
            lambda d: Select(d.find_element(By.ID, "log-source")).select_by_value("chat")
        )
        yield self.until(
            lambda d: (
                'fake chat: "POST /v1/chat/completions' in d.find_element(By.ID, "log-lines").text
            )
        )
        yield self.shot("logs")

        logged = yield self.browse(lambda d: d.get_log("browser"))
        self.assertEqual([e for e in logged if e["level"] == "SEVERE"], [])

    @inlineCallbacks
    def test_with_keys_no_key_no_data(self) -> Any:
        keys = [{"name": "ops", "key": ADMIN, "admin": True}]
        self.start({"chat": self.fake("chat")}, auth={"keys": keys})
        yield self.chat_with_key("chat")
        self.driver = yield self.in_thread(chromium)
        yield self.browse(lambda d: d.get(self.daemon.url + "/ui/"))
        yield self.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        rows = yield self.browse(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#model-rows tr, #activity-rows tr")
        )
        self.assertEqual(rows, [])
        yield self.browse(lambda d: d.find_element(By.ID, "login-key").send_keys(ADMIN))
        yield self.browse(lambda d: d.find_element(By.CSS_SELECTOR, "#login-form button").click())
        yield self.until(lambda d: self.cell("chat", 1)(d).startswith("ready"))
        url = yield self.browse(lambda d: d.current_url)
        self.assertNotIn(ADMIN, url)
        cookies = yield self.browse(lambda d: d.get_cookies())
        (session,) = cookies
        self.assertEqual((session["httpOnly"], session["sameSite"]), (True, "Strict"))
        self.assertNotIn(ADMIN, session["value"])

    def chat_with_key(self, model: str) -> Any:
        headers = {"Authorization": [f"Bearer {ADMIN}"]}
        return self.post("/v1/chat/completions", {"model": model}, headers=headers)

    @inlineCallbacks
    def test_hosts_each_row_names_its_box_and_an_engine_that_does_not_answer_is_shown(
        self,
    ) -> Any:
        away = "unix:///nonexistent/box2.sock"
        hosts = {"box1": {"docker": {"base_url": "unix:///run/box1.sock"}},
                 "box2": {"docker": {"base_url": away}}}  # fmt: skip
        ghost = {"container_name": "ghost", "backend_url": "http://${HOST}:9/v1", "host": "box2"}
        self.start({"chat": {**self.fake("chat"), "host": "box1"}, "ghost": ghost}, hosts=hosts)
        yield self.chat("chat")
        failed = self.post("/v1/chat/completions", {"model": "ghost", "messages": HI})
        self.assertEqual((yield failed).code, 503)  # box2's engine is not there
        self.driver = yield self.in_thread(chromium)
        yield self.browse(lambda d: d.get(self.daemon.url + "/ui/"))
        yield self.until(lambda d: "on host box1" in self.cell("chat", 2)(d))
        self.assertIn("on host box2", (yield self.browse(self.cell("ghost", 2))))
        shown = yield self.until(lambda d: d.find_element(By.ID, "budgets").text)
        self.assertIn(f"host box2: Cannot reach the Docker engine at {away} (host box2)", shown)


if not os.path.exists("/usr/bin/chromedriver"):  # `make test` installs it (browser-up.sh)
    raise RuntimeError("Debian's chromium-driver is missing: run tests/tools/browser-up.sh")
