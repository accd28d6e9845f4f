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
import yaml
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from twisted.internet.defer import inlineCallbacks

from llmswap.config.config import load
from tests.fakebackend import live_processes
from tests.support import HI, Daemon, wait_for
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

    def texts(self, selector: str) -> Any:
        """The text of each element ``selector`` matches, read in one step: the live views
        rebuild their rows, and rows read one by one may be gone by the next."""
        return self.browse(
            lambda d: d.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText.trim())",
                selector,
            )
        )

    def js(self, d: webdriver.Chrome, expression: str) -> Any:
        return d.execute_script(f"return {expression}")

    def drag(self, selector: str) -> Callable[[webdriver.Chrome], None]:
        """A drag across the middle half of an element (uPlot zooms to it)."""

        def step(d: webdriver.Chrome) -> None:
            over = d.find_element(By.CSS_SELECTOR, selector)
            width = over.size["width"]
            ActionChains(d).move_to_element_with_offset(
                over, -width // 4, 0
            ).click_and_hold().move_by_offset(width // 2, 0).release().perform()

        return step

    def hover_swap(self) -> Any:
        """Move the cursor over the timeline's last swap marker."""

        def step(d: webdriver.Chrome) -> None:
            left = self.js(
                d, "charts.chart.valToPos(timeline.swaps[timeline.swaps.length - 1].at, 'x')"
            )
            over = d.find_element(By.CSS_SELECTOR, "#chart .u-over")
            offset = int(left - over.size["width"] / 2)
            ActionChains(d).move_to_element_with_offset(over, offset, 0).perform()

        return self.browse(step)

    def shot(self, name: str) -> Any:
        return self.browse(lambda d: d.save_screenshot(str(DOCS / f"console-{name}.png")))

    @inlineCallbacks
    def test_every_view_live_in_a_real_browser(self) -> Any:
        self.start(
            {
                "chat": self.fake("chat", startup_delay=1.5),
                "coder": self.fake("coder", ttl=600, startup_delay=1.5),
            },
            devices={"ram": {"memory": "24GiB", "probe": "ram"}},
            state_dir=os.path.abspath(self.mktemp()),
            pools={"assistant": {"models": ["coder", "chat"]}},
            keepalive_interval=0.5,  # the playground shows the loading comments as they come
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
        row = yield self.texts("#queue-rows td")
        self.assertEqual(row[:3], ["1", "coder", "-"])
        yield self.shot("queue")
        yield busy
        yield waiting

        # Activity: the finished requests with their tokens.
        yield self.tab("activity")
        yield self.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#activity-rows tr")) >= 3)
        cells = yield self.texts("#activity-rows tr:first-child td")
        self.assertEqual(cells[1:5], ["chat", "coder", "-", "200"])
        self.assertEqual(cells[8:10], ["3", "3"])  # prompt and completion tokens, from usage

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

        yield self.shot("models")

        # Swaps: uPlot's timeline with time ticks, the queue as its own band, device memory.
        yield self.tab("swaps")
        yield self.until(lambda d: self.js(d, "charts.chart && charts.chart.series.length") >= 3)
        # uPlot draws its axes on a canvas: the labels it drew are read from it.
        ticks = yield self.browse(lambda d: self.js(d, "charts.chart.axes[0]._values"))
        self.assertGreaterEqual(len(ticks), 3)  # ticks along the time axis, the first dated
        self.assertRegex(ticks[0], r"\d+/\d+/\d+ \d+:\d\d")
        rows = yield self.browse(lambda d: self.js(d, "charts.chart.axes[1]._values"))
        self.assertEqual([r for r in rows if r], ["coder", "chat", "swaps"])
        yield self.until(
            lambda d: (
                self.js(
                    d,
                    "charts['chart-memory'] && "
                    "charts['chart-memory'].data[1].filter(v => v !== null).length",
                )
                >= 2
            )
        )
        memory = yield self.browse(
            lambda d: self.js(d, "charts['chart-memory'].series.map(s => s.label)")
        )
        self.assertEqual(memory[1:], ["ram in use (measured)", "ram budget"])
        causes = yield self.texts("#swap-rows tr td:nth-child(2)")
        self.assertIn("admin", causes)
        self.assertIn("request", causes)
        # Hover names a swap's cause and times; a drag zooms every chart of the view.
        yield self.hover_swap()
        hovered = yield self.until(lambda d: d.find_element(By.ID, "chart-hover").text)
        self.assertRegex(hovered, r"swap at .* \((request|admin)\): .* → .*, stop .*, load ")
        yield self.shot("swaps")
        before = yield self.browse(
            lambda d: self.js(d, "charts.chart.scales.x.max - charts.chart.scales.x.min")
        )
        yield self.browse(self.drag("#chart .u-over"))
        after = yield self.browse(
            lambda d: self.js(
                d, "[charts.chart.scales.x, charts['chart-queue'].scales.x].map(x => x.max - x.min)"
            )
        )
        self.assertLess(after[0], before / 2)
        self.assertAlmostEqual(after[1], after[0], places=3)  # the queue band follows the zoom

        # A request failed on purpose: its Activity row opens what explains it.
        failing = {"model": "chat", "messages": [{"role": "user", "content": "fail me"}],
                   "fake_status": 500}  # fmt: skip
        self.assertEqual((yield self.post("/v1/chat/completions", failing)).code, 500)
        yield self.tab("activity")
        yield self.until(
            lambda d: self.js(d, "charts['chart-rate'] && charts['chart-rate'].series.length") >= 3
        )
        yield self.click("#activity-rows tr.failed")
        yield self.until(lambda d: '"POST /v1/chat/completions HTTP/1.1" 500'
                         in d.find_element(By.ID, "failure-output").text)  # fmt: skip
        title = yield self.browse(lambda d: d.find_element(By.ID, "failure-title").text)
        self.assertRegex(title, r"POST /v1/chat/completions → chat: status 500$")
        answer = yield self.browse(lambda d: d.find_element(By.ID, "failure-answer").text)
        self.assertIn("fake failure", answer)
        yield self.shot("failed")

        # Replayed into the playground, then a chat there that waits for a swap and streams.
        yield self.click("#failure-replay")
        typed = yield self.browse(
            lambda d: d.find_element(By.ID, "pg-input").get_attribute("value")
        )
        self.assertEqual(typed, "fail me")
        yield self.browse(
            lambda d: Select(d.find_element(By.ID, "pg-model")).select_by_value("coder")
        )
        yield self.until(lambda d: self.js(d, "state.models.coder.state") == "stopped")
        yield self.click("#pg-send")
        yield self.until(lambda d: "loading coder" in d.find_element(By.ID, "pg-status").text)
        yield self.until(lambda d: "tokens/s" in d.find_element(By.ID, "pg-status").text)
        status = yield self.browse(lambda d: d.find_element(By.ID, "pg-status").text)
        self.assertRegex(
            status,
            r"^first token after [\d.]+ s \(the model was loaded for it\); "
            r"5 tokens, [\d.]+ tokens/s$",
        )
        said = yield self.browse(
            lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#pg-messages .msg")]
        )
        self.assertEqual(said, ["fail me", "t0 t1 t2 t3 t4 "])  # as streamed
        yield self.shot("playground")
        names = yield self.browse(
            lambda d: [
                o.get_attribute("value") for o in Select(d.find_element(By.ID, "pg-model")).options
            ]
        )
        self.assertEqual(sorted(names), ["assistant", "chat", "coder"])  # the pool too
        # Embeddings: dimensions and norm; a transcription of a file uploaded from the page.
        yield self.browse(
            lambda d: Select(d.find_element(By.ID, "pg-mode")).select_by_value("embed")
        )
        yield self.browse(lambda d: d.find_element(By.ID, "pg-input").send_keys("a sentence"))
        yield self.click("#pg-send")
        embedded = yield self.until(lambda d: d.find_element(By.ID, "pg-result").text)
        self.assertEqual(embedded.splitlines()[:2], ["dimensions: 3", "norm: 0.9354"])
        audio = Path(self.mktemp())
        audio.write_bytes(b"RIFF....WAVEfmt " + bytes(64))
        yield self.browse(
            lambda d: Select(d.find_element(By.ID, "pg-mode")).select_by_value("transcribe")
        )
        yield self.browse(
            lambda d: d.find_element(By.ID, "pg-file").send_keys(str(audio.resolve()))
        )
        yield self.click("#pg-send")
        yield self.until(lambda d: d.find_element(By.ID, "pg-result").text == "heard coder")

        # The playground's request went through the queue as the console's.
        yield self.tab("activity")
        yield self.until(
            lambda d: (
                "console" in d.find_element(By.CSS_SELECTOR, "#activity-rows tr:first-child").text
            )
        )
        yield self.shot("activity")
        yield self.tab("keys")
        yield self.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#key-rows tr[data-key="-"]'))
        cells = yield self.texts('#key-rows tr[data-key="-"] td')
        self.assertEqual(cells[4:6], ["1", "0"])  # one error, no limit hit
        yield self.shot("keys")

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

    @inlineCallbacks
    def test_the_config_view_refuses_an_error_at_its_line_and_applies_a_valid_edit(self) -> Any:
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        path = root / "llmswap.yaml"
        # Without auth the file is edited only where the owner says so (it says what runs).
        raw = {"models": {"chat": self.fake("chat")}, "console": {"edit_config": True}}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.daemon = Daemon.from_config(load(path), str(root / "logs"))
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        yield self.chat("chat")
        self.driver = yield self.in_thread(chromium)
        yield self.browse(lambda d: d.get(self.daemon.url + "/ui/"))
        yield self.until(lambda d: d.find_element(By.ID, "link").text == "live")
        yield self.tab("config")
        text = yield self.until(lambda d: d.find_element(By.ID, "cfg-text").get_attribute("value"))
        self.assertEqual(text, path.read_text())
        running = yield self.browse(lambda d: d.find_element(By.ID, "cfg-running").text)
        self.assertIn("OK, 1 models", running)

        lines = text.splitlines()
        at = lines.index("  chat:") + 2  # the line after the model's name
        bad = "\n".join([*lines[: at - 1], "    ttll: 5", *lines[at - 1 :]]) + "\n"
        yield self.browse(self.type_config(bad))
        yield self.click("#cfg-check")
        marked = yield self.until(
            lambda d: [b.text for b in d.find_elements(By.CSS_SELECTOR, "#cfg-gutter b")]
        )
        self.assertEqual(marked, [str(at)])
        problem = yield self.browse(lambda d: d.find_element(By.ID, "cfg-problems").text)
        self.assertTrue(problem.startswith(f"line {at}: unknown key 'models.chat.ttll'"), problem)
        yield self.click("#cfg-apply")
        yield self.until(lambda d: "not applied" in d.find_element(By.ID, "cfg-status").text)
        self.assertEqual(path.read_text(), text)  # refused: the file is untouched
        yield self.shot("config-error")

        coder = yaml.safe_dump({"coder": self.fake("coder")}, sort_keys=False)
        good = bad.replace("ttll: 5", "ttl: 5").replace(
            "models:\n", "models:\n" + "".join(f"  {line}\n" for line in coder.splitlines()), 1
        )
        yield self.browse(self.type_config(good))
        yield self.click("#cfg-apply")
        changes = yield self.until(lambda d: d.find_element(By.ID, "cfg-changes").text)
        self.assertEqual(changes.splitlines(), ["added: coder", "changed: chat", "removed: none",
                                                "restarted: chat"])  # fmt: skip
        self.assertEqual(path.read_text(), good)
        self.assertEqual((root / "llmswap.yaml.bak").read_text(), text)
        health = yield self.health()
        self.assertEqual(sorted(health["models"]), ["chat", "coder"])
        yield self.shot("config")

    def type_config(self, text: str) -> Callable[[webdriver.Chrome], None]:
        """Put ``text`` in the editor as typing does (an input event)."""
        return lambda d: d.execute_script(
            "const t = document.getElementById('cfg-text'); t.value = arguments[0];"
            "t.dispatchEvent(new Event('input'));",
            text,
        )

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
