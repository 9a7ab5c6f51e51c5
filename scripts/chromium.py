"""Headless Chromium driven over the DevTools protocol on a pipe: open local pages, read their DOM,
collect console errors, take screenshots. Used by tests/test_dashboard.py and
benchmarks/dashboard.py; needs the `chromium` binary (Debian's package: `apt-get install chromium`).

`--remote-debugging-pipe` makes Chromium read protocol messages (JSON, each ended by a NUL byte) on
its file descriptor 3 and write replies and events on descriptor 4, so no websocket library and no
network port are needed.

    with Browser() as browser:
        page = browser.open("/tmp/dash/index.html")      # waits for the load event and for idle
        page.evaluate("document.title")
        page.errors                                      # console errors, exceptions, failed loads
        page.screenshot("/tmp/index.png")
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# Flags for a headless run as root in a container: no sandbox, no GPU, nothing that reaches the network.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
]


def chromium_binary() -> str | None:
    """The path of a Chromium (or Chrome) executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process with a fresh profile in a temporary folder."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        binary = chromium_binary()
        if binary is None:
            raise BrowserError("no chromium executable found; install Debian's `chromium` package")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The child must find the pipe ends at fds 3 (it reads commands) and 4 (it writes replies):
        # moved above 10 first, so that placing one never overwrites the other.
        high_read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD_CLOEXEC, 10)
        high_write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_read)
        os.close(from_browser_write)

        def place_pipes() -> None:  # in the child, before exec; dup2 leaves the copies inheritable
            os.dup2(high_read, 3)
            os.dup2(high_write, 4)

        try:
            self.process = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                 "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=False, preexec_fn=place_pipes,
            )
        finally:
            os.close(high_read)
            os.close(high_write)
        self._next_id = 0
        self._pending = b""
        self.events: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- the protocol
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its reply (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._pending:
            if time.monotonic() > deadline:
                raise BrowserError("no reply from chromium")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError("chromium closed its pipe (it crashed or could not start)")
            self._pending += chunk
        message, self._pending = self._pending.split(b"\0", 1)
        return json.loads(message)

    def wait_for(self, method: str, session: str, timeout: float | None = None) -> dict:
        """The next event `method` of `session` (events already received count)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        index = 0
        while True:
            for i in range(index, len(self.events)):
                event = self.events[i]
                if event.get("method") == method and event.get("sessionId") == session:
                    del self.events[i]
                    return event
            index = len(self.events)
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {method}")
            self.events.append(self._read())

    # ---------------------------------------------------------------- pages
    def open(self, path: str | os.PathLike, fragment: str = "") -> "Page":
        """A new tab showing the local file `path` (with `#fragment`), after its load event."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        url = Path(path).resolve().as_uri() + (f"#{fragment}" if fragment else "")
        started = time.perf_counter()
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired", session)
        page.load_seconds = time.perf_counter() - started
        return page

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close")
                except BrowserError:
                    pass
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: evaluate JavaScript, wait for a condition, read errors, take screenshots."""

    def __init__(self, browser: Browser, session: str):
        self.browser = browser
        self.session = session
        self.load_seconds = float("nan")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression (awaited if it is a promise)."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                         "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} stayed falsy for {timeout} s")
            time.sleep(0.05)

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed resource loads seen so far in this tab."""
        self.evaluate("0")  # a round trip, so that events sent before now have arrived
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
        return found

    def screenshot(self, path: str | os.PathLike, full_page: bool = True) -> Path:
        """A PNG of the tab (the whole page when `full_page`)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": min(size[1], 6000), "scale": 1}
        data = self.browser.send("Page.captureScreenshot", params, session=self.session)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
