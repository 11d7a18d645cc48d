"""Just enough of the Chrome DevTools Protocol to drive headless Chromium from a test.

One WebSocket to the browser carries everything; each page is a target attached in flat mode,
so its commands travel on that same socket tagged with a session id. No new dependency: the
protocol is JSON over a WebSocket, which aiohttp speaks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-port=0",
)


class CDPError(Exception):
    """The browser answered a command with an error, or a page script threw."""


def find_chromium() -> str | None:
    """The Chromium binary, or ``None`` if it is not installed."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    return shutil.which("chromium")


class Chromium:
    """A headless Chromium process with remote debugging on a free loopback port."""

    def __init__(self, binary: str, user_data_dir: Path) -> None:
        self.user_data_dir = user_data_dir
        self._log = (user_data_dir.parent / "chromium.log").open("wb")
        # Chromium leaves a folder of its own in TMPDIR (org.chromium.Chromium.*): keep it
        # with the profile, which pytest cleans up, not in /tmp.
        scratch = user_data_dir.parent / "tmp"
        scratch.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(scratch)},
        )

    def devtools_url(self, timeout: float = 30.0) -> str:
        """The browser's DevTools WebSocket URL, once Chromium has written it down."""
        port_file = self.user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError):
                lines = port_file.read_text().split()
                if len(lines) >= 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate the browser (kill it if it lingers) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Browser:
    """A DevTools connection to the whole browser."""

    def __init__(
        self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse[bool]
    ) -> None:
        self._http = http
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> Browser:
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(url, max_msg_size=0)
        except BaseException:
            await http.close()
            raise
        return cls(http, ws)

    async def send(self, method: str, session_id: str | None = None, **params: Any) -> Any:
        """Run one command and return its result."""
        command_id = next(self._ids)
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        await self._ws.send_str(json.dumps(message))
        answer = await asyncio.wait_for(future, timeout=30)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("the DevTools connection closed"))

    async def new_page(self, *, width: int = 1280, height: int = 860) -> Page:
        """A fresh tab in its own browser context (no shared storage with other pages)."""
        context = (await self.send("Target.createBrowserContext"))["browserContextId"]
        target = await self.send("Target.createTarget", url="about:blank", browserContextId=context)
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self, attached["sessionId"], context)
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await page.send("Emulation.setScrollbarsHidden", hidden=True)
        return page

    async def close(self) -> None:
        await self._ws.close()
        await self._http.close()
        await asyncio.gather(self._reader, return_exceptions=True)


class Page:
    """One tab: navigate, run scripts, wait for conditions, take screenshots."""

    def __init__(self, browser: Browser, session_id: str, context_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.context_id = context_id

    async def send(self, method: str, **params: Any) -> Any:
        return await self.browser.send(method, self.session_id, **params)

    async def navigate(self, url: str, *, timeout: float = 10.0) -> None:
        """Open ``url`` and wait until its document (scripts included) has loaded."""
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        await self.wait_for("document.readyState === 'complete'", timeout=timeout, what=url)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"script failed: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout: float = 10.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy and return its value; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or expression} (last: {value!r})"
                )
            await asyncio.sleep(0.05)

    async def screenshot(self) -> bytes:
        """The whole page as a PNG."""
        result = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        await self.browser.send("Target.disposeBrowserContext", browserContextId=self.context_id)
