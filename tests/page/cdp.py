"""Debian's headless chromium driven over the DevTools protocol (a websocket, aiohttp's client).

`Browser.launch(tmp)` starts one chromium for a module; `await browser.page()` opens a tab
in a browser context of its own (its own cookies), with `goto`, `evaluate`, `wait_for`,
`dom` and `screenshot`. Only what the page tests need; everything else of the protocol is
left alone.
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

CHROMIUM = shutil.which("chromium")  # Debian's; tests/run installs it
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,900",
]


class CdpError(AssertionError):
    pass


def _spawn(profile: Path, log: Path) -> subprocess.Popen[bytes]:
    profile.mkdir(parents=True, exist_ok=True)
    assert CHROMIUM is not None
    argv = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    with log.open("wb") as out:
        return subprocess.Popen([*argv, "about:blank"], stdout=out, stderr=subprocess.STDOUT)


def _devtools_address(proc: subprocess.Popen[bytes], profile: Path) -> tuple[str, str]:
    """Chromium writes its DevTools port and browser path to the profile once it listens."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while True:
        lines = port_file.read_text().splitlines() if port_file.exists() else []
        if len(lines) >= 2:
            return lines[0], lines[1]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise CdpError(f"chromium did not start (exit {proc.poll()})")
        time.sleep(0.05)


class Browser:
    def __init__(self, proc: subprocess.Popen[bytes], session: aiohttp.ClientSession) -> None:
        self.proc = proc
        self._http = session
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def launch(cls, profile: Path, log: Path) -> Browser:
        proc = await asyncio.to_thread(_spawn, profile, log)
        browser = cls(proc, aiohttp.ClientSession())
        try:
            port, path = await asyncio.to_thread(_devtools_address, proc, profile)
            browser._ws = await browser._http.ws_connect(
                f"ws://127.0.0.1:{port}{path}", max_msg_size=0
            )
        except BaseException:
            await browser.close()
            raise
        browser._reader = asyncio.create_task(browser._read())
        return browser

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self._waiting.values():
            future.set_exception(CdpError("chromium closed the DevTools connection"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        await self._ws.send_str(json.dumps(message))
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    async def page(self) -> Page:
        context = (await self.send("Target.createBrowserContext"))["browserContextId"]
        target = await self.send(
            "Target.createTarget", {"url": "about:blank", "browserContextId": context}
        )
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"], context)
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


class Page:
    def __init__(self, browser: Browser, session: str, context: str) -> None:
        self.browser = browser
        self.session = session
        self.context = context

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    async def goto(self, url: str) -> None:
        answer = await self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CdpError(f"navigating to {url}: {answer['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        answer = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in answer:
            raise CdpError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(CdpError):  # mid-navigation: no context yet
                last = await self.evaluate(expression)
                if last:
                    return last
            await asyncio.sleep(0.1)
        dom = await self.dom()
        raise AssertionError(f"timed out waiting for {expression} (last {last!r}):\n{dom[:3000]}")

    async def dom(self) -> str:
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self, path: Path) -> Path:
        """The whole page (beyond the 1280x900 window when it is longer), as PNG."""
        size = (await self.call("Page.getLayoutMetrics"))["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": 1280, "height": max(900, size["height"]), "scale": 1}
        shot = await self.call(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
        )
        await asyncio.to_thread(_write, path, base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        await self.browser.send("Target.disposeBrowserContext", {"browserContextId": self.context})


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def artifacts_dir(repo: Path) -> Path:
    """Screenshots go to $DGDM_ARTIFACTS/page, else test-artifacts/page in the repo
    (gitignored), kept after the run for a person to look at."""
    root = (
        Path(os.environ["DGDM_ARTIFACTS"])
        if os.environ.get("DGDM_ARTIFACTS")
        else repo / "test-artifacts"
    )
    return root / "page"
