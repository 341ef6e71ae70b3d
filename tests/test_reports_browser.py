"""The report in a real browser: headless Chromium opens the pages from file://.

Driven over the DevTools protocol on ``--remote-debugging-pipe`` (fds 3 and 4, JSON
messages ended by NUL) with the standard library only. Checks: no console errors or
exceptions, no request leaves file:/data:, no broken image, the page script runs
(CSP hash accepted: the table sorts), the hostile prompt shows as text and opens no
dialog, and a screenshot is not blank.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from support.sample_run import write_sample_run

from embedpin.reports.builder import rebuild

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--window-size=1280,1600"]
HOSTILE = "<script>alert(1)</script> & \"quotes\""


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, user_data_dir: Path, timeout: float = 60.0):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # above fd 9, so moving them onto 3 and 4 in the child cannot clobber one another
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_r, from_browser_w)]
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)

        def child_fds() -> None:
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in high:
            os.close(fd)
        self.write_fd, self.read_fd = to_browser_w, from_browser_r
        self.timeout, self.buffer, self.events, self.next_id = timeout, b"", [], 0

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.write_fd)
        os.close(self.read_fd)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("no answer from chromium over the debugging pipe")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        """Block until an event named ``method`` arrives (returns it)."""
        deadline = time.monotonic() + self.timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def drain(self, seconds: float) -> None:
        """Collect the events of the next ``seconds`` (late console errors, lazy images)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass


def open_page(tools: DevTools, url: str) -> str:
    """Attach to the page target, enable the domains we watch and load ``url``; returns the session."""
    targets = tools.send("Target.getTargets")["targetInfos"]
    page = next(t for t in targets if t["type"] == "page")
    session = tools.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        tools.send(f"{domain}.enable", session=session)
    tools.events.clear()
    tools.send("Page.navigate", {"url": url}, session=session)
    tools.wait_for("Page.loadEventFired")
    tools.drain(0.5)
    return session


def evaluate(tools: DevTools, session: str, expression: str):
    result = tools.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    return result["result"].get("value")


def problems(events: list[dict]) -> list[str]:
    """Console errors, exceptions, failed loads, dialogs and any request that is not file:/data:."""
    found = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            found.append(f"console {params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            found.append(f"log {params['entry']['level']}: {params['entry'].get('text')}")
        elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("file:", "data:")):
            found.append(f"network request: {params['request']['url']}")
        elif method == "Network.loadingFailed":
            found.append(f"failed load: {params.get('errorText')}")
        elif method == "Page.javascriptDialogOpening":
            found.append(f"dialog: {params.get('message')}")
    return found


def assert_not_blank(png: bytes) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] >= 800
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "screenshot looks blank"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = write_sample_run(tmp_path_factory.mktemp("runs") / "0001-browser", generations=2, population=3,
                            batch=4, prompt=HOSTILE, status="finished")
    rebuild(root)
    return root


@pytest.fixture
def tools(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI's .ci/run installs it")
    client = DevTools(tmp_path / "profile")
    yield client
    client.close()


def test_run_page_in_chromium(run_dir, tools):
    session = open_page(tools, (run_dir / "index.html").as_uri())
    assert problems(tools.events) == []
    requested = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    assert any(u.endswith("report/loss.png") for u in requested)
    assert evaluate(tools, session, "document.querySelector('.prompt').textContent") == HOSTILE
    assert evaluate(tools, session, "document.scripts.length") == 1
    broken = "Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)"
    assert evaluate(tools, session, broken) == []
    # the page script runs under the CSP hash: clicking "worst" sorts the table by it
    order = evaluate(tools, session, """(() => {
        const th = [...document.querySelectorAll('table.sortable th')].find(h => h.textContent === 'worst');
        th.click(); th.click();
        return [...document.querySelectorAll('table.sortable tbody tr')].map(r => +r.cells[3].dataset.v);
    })()""")
    assert order == sorted(order, reverse=True) and len(order) == 2
    shot = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    assert_not_blank(base64.b64decode(shot))
    assert problems(tools.events) == []


def test_generation_page_in_chromium(run_dir, tools):
    session = open_page(tools, (run_dir / "generations" / "0001" / "index.html").as_uri())
    assert problems(tools.events) == []
    assert evaluate(tools, session, "document.querySelectorAll('.card').length") == 3
    assert evaluate(tools, session, "document.querySelectorAll('.card .bars').length") == 12
    assert evaluate(tools, session, "document.querySelectorAll('meta[http-equiv=refresh]').length") == 0
    shot = tools.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
    assert_not_blank(base64.b64decode(shot))


def test_a_real_analysed_run_in_chromium(finished_analysed, tools):
    """The shared small run, token analysis included: its pages load clean, the token chart
    loads, the table names every token, and the generation page shows each candidate's searched
    parameters (the default run searches the token vectors alone)."""
    run, analysis = finished_analysed
    rows = [r.token for r in analysis.rows]
    session = open_page(tools, (run / "index.html").as_uri())
    assert problems(tools.events) == []
    broken = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
    assert evaluate(tools, session, broken) == []
    assert evaluate(tools, session, "[...document.images].some(i => i.src.endsWith('report/tokens.png'))")
    shown = evaluate(tools, session, """[...document.querySelectorAll('table')].find(t => t.querySelector('th')
        .textContent === 'token').querySelectorAll('tbody tr td:first-child')""" + ".length")
    assert shown == len(rows) and "star" in rows
    assert_not_blank(base64.b64decode(tools.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]))
    session = open_page(tools, (run / "generations" / "0002" / "index.html").as_uri())
    assert problems(tools.events) == []
    text = evaluate(tools, session, "document.body.innerText")
    assert text.count("token_vectors") >= 4  # a row per candidate
