"""Headless Chromium over the DevTools protocol, for the browser tests and bench/browser_latency.py.

    async with chromium(profile_dir) as cdp:                 # fake camera (test pattern), loopback WebRTC allowed
        target, page = await open_page(cdp, url)
        ...

Nothing is downloaded: Debian's chromium, driven on a loopback websocket (aiohttp).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
# A fake camera and no permission prompt; loopback WebRTC candidates; none of Chromium's own network traffic.
CAMERA_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream=fps=30",
                "--use-fake-ui-for-media-stream", "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-background-networking", "--no-first-run")


class ChromiumError(RuntimeError):
    """Chromium did not start or did not open its DevTools port."""


class DevTools:
    """The smallest DevTools-protocol client: send a command (optionally to a page session), await its result."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            future = self.pending.pop(data.get("id"), None)
            if future is not None and not future.done():
                future.set_result(data)

    async def send(self, method: str, session: str | None = None, **params) -> dict:
        mid = next(self.ids)
        self.pending[mid] = asyncio.get_running_loop().create_future()
        message = {"id": mid, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(self.pending[mid], 20)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, session: str, expression: str):
        result = await self.send("Runtime.evaluate", session, expression=expression, returnByValue=True,
                                 awaitPromise=True)
        return result["result"].get("value")


async def launch(profile: Path, flags: Sequence[str] = CAMERA_FLAGS, chromium: str | None = None,
                 ) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium with `flags` and a fresh profile; -> (process, DevTools websocket URL)."""
    proc = subprocess.Popen([chromium or CHROMIUM, *flags, "--remote-debugging-address=127.0.0.1",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if port_file.exists() and len(port_file.read_text().split()) == 2:
            port, path = port_file.read_text().split()
            return proc, f"ws://127.0.0.1:{port}{path}"
        if proc.poll() is not None:
            raise ChromiumError(f"Chromium exited with {proc.returncode} before opening DevTools")
        await asyncio.sleep(0.1)
    proc.kill()
    raise ChromiumError("Chromium did not open its DevTools port within 30 s")


@asynccontextmanager
async def chromium(profile: Path, flags: Sequence[str] = CAMERA_FLAGS, binary: str | None = None,
                   ) -> AsyncIterator[DevTools]:
    """Headless Chromium (`launch`) driven over its DevTools websocket; stopped on exit, also on errors."""
    import aiohttp

    proc, ws_url = await launch(profile, flags, binary)
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
            cdp = DevTools(ws)
            try:
                yield cdp
            finally:
                cdp.reader.cancel()
    finally:
        stop(proc)


async def open_page(cdp: DevTools, url: str) -> tuple[str, str]:
    """A new tab at `url`, attached: -> (target id for Target.closeTarget, session id for DevTools.send/evaluate)."""
    target = (await cdp.send("Target.createTarget", url=url))["targetId"]
    return target, (await cdp.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]


def stop(proc: subprocess.Popen, wait_s: float = 10) -> None:
    """End a launched process (Chromium, a server): terminate, then kill if it has not gone within wait_s."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
