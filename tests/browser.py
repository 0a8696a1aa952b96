"""Headless Chromium (Debian's ``chromium``) driven over the Chrome DevTools Protocol, for tests that look
at a page: navigate, set a cookie, wait until texts are rendered, take a screenshot. No downloaded browser,
no Playwright: the protocol's websocket is spoken with aiohttp (a Ray dependency)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1440,900",
]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with a fresh profile and one page; ``async with Browser() as b``."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise RuntimeError("chromium not found (apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="farm-chromium-")
        self.proc: subprocess.Popen | None = None
        self._id = 0

    async def __aenter__(self) -> Browser:
        import aiohttp

        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = Path(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Network.enable")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.ws.close()
            await self.http.close()
        finally:
            if self.proc and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One protocol call; events that arrive meanwhile are dropped (tests poll the page instead)."""
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=60)).data)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def set_cookie(self, url: str, name: str, value: str) -> None:
        await self.send("Network.setCookie", url=url, name=name, value=value, httpOnly=True)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def text(self) -> str:
        """The rendered page's visible text (what a user reads), not its HTML source."""
        r = await self.send("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                            returnByValue=True)
        return r["result"].get("value") or ""

    async def click_text(self, text: str) -> bool:
        """Click the innermost element whose visible text is exactly ``text`` (a section header, a tab);
        False when there is none."""
        js = (
            "(() => { const all = [...document.querySelectorAll('body *')].filter("
            f"e => e.innerText && e.innerText.trim() === {json.dumps(text)});"
            " const el = all.find(e => ![...e.children].some(c => all.includes(c)));"
            " if (!el) return false; el.scrollIntoView(); el.click(); return true; })()"
        )
        r = await self.send("Runtime.evaluate", expression=js, returnByValue=True)
        return bool(r["result"].get("value"))

    async def fill(self, label: str, value: str) -> int:
        """Type ``value`` into every input labelled ``label`` (React-controlled inputs: the native setter,
        then an input event, as typing does); returns how many inputs were filled."""
        js = (
            "(() => { let n = 0; const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype,"
            " 'value').set; for (const l of document.querySelectorAll('label')) {"
            f" if (l.innerText.trim() !== {json.dumps(label)}) continue;"
            " const i = l.parentElement.querySelector('input'); if (!i) continue;"
            f" set.call(i, {json.dumps(value)}); i.dispatchEvent(new Event('input', {{bubbles: true}})); n++; }}"
            " return n; })()"
        )
        r = await self.send("Runtime.evaluate", expression=js, returnByValue=True)
        return int(r["result"].get("value") or 0)

    async def wait_for(self, texts: list[str], timeout: float = 60) -> str:
        """Poll the rendered text until every one of ``texts`` is in it; returns that text (or the last
        one seen, on timeout, for the test's message)."""
        deadline, seen = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            seen = await self.text()
            if all(t in seen for t in texts):
                return seen
            await asyncio.sleep(0.5)
        return seen

    async def screenshot(self, path: str | Path, height: int | None = None) -> None:
        """A PNG of the viewport; ``height`` makes the window that tall first (a long table in one image)."""
        if height:
            await self.send("Emulation.setDeviceMetricsOverride", width=1440, height=height, deviceScaleFactor=1,
                            mobile=False)
            await asyncio.sleep(1)  # let the page lay itself out again
        r = await self.send("Page.captureScreenshot", format="png")
        Path(path).write_bytes(base64.b64decode(r["data"]))
