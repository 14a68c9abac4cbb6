"""Helpers for the live-path tests: an in-process server on a free loopback port, and an aiortc camera client."""
from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription

from engine.config import StreamConfig
from streaming.server import AvatarServer, restrict_ice_to_loopback, serve


@contextlib.asynccontextmanager
async def running_server(config: StreamConfig, make_renderer, reference: np.ndarray, loopback_ice: bool = True,
                         **kw):
    """Serve on 127.0.0.1 (port 0 picks a free one) with loopback-only ICE (`loopback_ice`: for the whole process,
    as `serve --loopback-ice` does; False: the server's own per-connection loopback candidates); yields
    (server, base url)."""
    if loopback_ice:
        restrict_ice_to_loopback()
    server = AvatarServer(config, make_renderer, reference, **kw)
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(server, ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the startup error
    url = ready.result()
    try:
        yield server, url
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def post_offer(url: str, pc: RTCPeerConnection) -> dict:
    """Send pc's offer to /offer, apply the answer; returns the answer JSON (with the session id)."""
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "offer", json={"sdp": pc.localDescription.sdp,
                                                  "type": pc.localDescription.type}) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return answer


async def get_stats(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "stats") as resp:
            return await resp.json()


async def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Poll an async predicate until it returns something truthy; returns it, or None after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    return None
