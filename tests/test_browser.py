"""Headless Chromium with a fake camera opens the camera page and plays the avatar; closing the page frees the session.

Chromium is driven over the DevTools protocol on a loopback websocket (aiohttp), nothing else is downloaded.
The fake camera shows a test pattern, not a face: the preview renderer keeps sending the portrait and /stats says
face_found is False.
"""
from __future__ import annotations

import asyncio

import pytest

from engine.config import StreamConfig
from engine.preview import PreviewRenderer, load_reference
from chromium import CHROMIUM, chromium, open_page
from live_util import get_stats, running_server, wait_for

W, H = 320, 320

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")]


PLAYBACK = """(() => { const v = document.getElementById('avatar');
  const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : {totalVideoFrames: 0};
  return {time: v.currentTime, width: v.videoWidth, height: v.videoHeight, paused: v.paused,
          ready: v.readyState, frames: q.totalVideoFrames,
          face: document.getElementById('face').textContent, message: document.getElementById('message').textContent};
})()"""


VIEWER = """(() => { const v = document.getElementById('avatar'); if (!v) return null;
  return {time: v.currentTime, width: v.videoWidth, height: v.videoHeight,
          frames: v.getVideoPlaybackQuality().totalVideoFrames}; })()"""


def test_chromium_plays_avatar_and_frees_session(data, tmp_path):
    reference = load_reference(data("reference", "lp_s6.jpg"))
    make = lambda: PreviewRenderer(reference, W, H)  # noqa: E731

    async def scenario():
        async with running_server(StreamConfig(port=0, width=W, height=H, fps=25), make, reference,
                                  renderer_name="preview") as (server, url):
            async with chromium(tmp_path / "profile") as cdp:
                target, page = await open_page(cdp, url)
                await wait_for(lambda: cdp.evaluate(page, "!!document.getElementById('start')"), 20)
                await cdp.evaluate(page, "document.getElementById('start').click()")

                async def playing():
                    state = await cdp.evaluate(page, PLAYBACK)
                    return state if state["frames"] >= 25 and state["time"] > 0.5 and not state["paused"] \
                        else None
                state = await wait_for(playing, 45, interval=0.5)
                last_page = await cdp.evaluate(page, PLAYBACK)
                later = await wait_for(lambda: _advanced(cdp, page, last_page), 10)
                stats = await get_stats(url)

                # The OBS page: receive-only, it mirrors the newest camera session.
                viewer, vpage = await open_page(cdp, url + "viewer")

                async def viewer_playing():
                    v = await cdp.evaluate(vpage, VIEWER)
                    return v if v and v["frames"] >= 10 and v["time"] > 0.2 else None
                viewer_state = await wait_for(viewer_playing, 30, interval=0.5)
                kinds = sorted(s["kind"] for s in (await get_stats(url))["sessions"])

                await cdp.send("Target.closeTarget", targetId=target)
                await cdp.send("Target.closeTarget", targetId=viewer)
                freed = await wait_for(lambda: _count_is(url, 0), 15)
            return state, last_page, later, stats, viewer_state, kinds, freed

    state, last_page, later, stats, viewer_state, kinds, freed = asyncio.run(scenario())

    assert state is not None, f"the avatar video never played: {last_page}"
    assert (state["width"], state["height"]) == (W, H)
    assert later is not None, "the avatar video stopped advancing"
    assert stats["session_count"] == 1, stats
    (session,) = stats["sessions"]
    assert session["kind"] == "camera" and session["renderer"] == "preview"
    assert session["fps_out"] > 0 and session["fps_in"] > 0, session
    assert session["face_found"] is False, "the fake camera shows a test pattern: no face should be reported"
    assert last_page["face"].startswith("no"), f"the page shows face found = {last_page['face']!r}"
    assert viewer_state is not None and (viewer_state["width"], viewer_state["height"]) == (W, H), viewer_state
    assert kinds == ["camera", "viewer"], kinds
    assert freed, "the sessions were not freed after the pages closed"


async def _advanced(cdp: DevTools, page: str, before: dict):
    now = await cdp.evaluate(page, PLAYBACK)
    return now if now["frames"] > before["frames"] and now["time"] > before["time"] else None


async def _count_is(url: str, n: int) -> bool:
    return (await get_stats(url))["session_count"] == n


PAGE_STATE = """(() => { const $ = (id) => document.getElementById(id);
  const rect = (id) => { const r = $(id).getBoundingClientRect(); return [r.right, r.bottom]; };
  return {fields: ["renderer", "face", "fps", "latency", "queue", "sessions"].map((id) => $(id).textContent),
          label: $("latency-label").textContent, sessions: $("sessions").textContent,
          visible: ["start", "stop", "stats"].map(rect), window: [innerWidth, innerHeight],
          scroll: [document.documentElement.scrollWidth, document.documentElement.scrollHeight]};
})()"""


def test_page_measures_latency_counts_viewers_apart_and_resets_on_stop(data, tmp_path):
    """At a 1000x700 window the controls are in view; the page measures glass-to-glass itself (frame numbers in the
    camera frames come back in the avatar); a /viewer is not one more camera; after Stop no stale figure stays."""
    reference = load_reference(data("reference", "lp_s6.jpg"))
    make = lambda: PreviewRenderer(reference, W, H)  # noqa: E731

    async def scenario():
        async with running_server(StreamConfig(port=0, width=W, height=H, fps=25), make, reference,
                                  renderer_name="preview") as (server, url):
            async with chromium(tmp_path / "profile") as cdp:
                target, page = await open_page(cdp, "about:blank")
                await cdp.send("Emulation.setDeviceMetricsOverride", page, width=1000, height=700,
                               deviceScaleFactor=1, mobile=False)
                await cdp.send("Page.navigate", page, url=url)
                await wait_for(lambda: cdp.evaluate(page, "!!document.getElementById('start')"), 20)
                layout = await cdp.evaluate(page, PAGE_STATE)
                await cdp.evaluate(page, "document.getElementById('start').click()")

                async def measured():
                    state = await cdp.evaluate(page, PAGE_STATE)
                    return state if "measured" in state["label"] and "p95" in state["fields"][3] else None
                measuring = await wait_for(measured, 45, interval=0.5)
                samples = await cdp.evaluate(page, "flashlive.latency()")

                viewer = (await cdp.send("Target.createTarget", url=url + "viewer"))["targetId"]

                async def counted():
                    state = await cdp.evaluate(page, PAGE_STATE)
                    return state if "viewer" in state["sessions"] else None
                with_viewer = await wait_for(counted, 30, interval=0.5)

                await cdp.evaluate(page, "document.getElementById('stop').click()")
                right_after = await cdp.evaluate(page, PAGE_STATE)
                await asyncio.sleep(2.5)  # a stats poll in flight at Stop must not bring old figures back
                later = await cdp.evaluate(page, PAGE_STATE)
                left = await wait_for(lambda: _cameras_are(url, 0), 15)
                await cdp.send("Target.closeTarget", targetId=viewer)
                await cdp.send("Target.closeTarget", targetId=target)
            return layout, measuring, samples, with_viewer, right_after, later, left

    layout, measuring, samples, with_viewer, right_after, later, left = asyncio.run(scenario())

    assert layout["window"] == [1000, 700], layout
    for right, bottom in layout["visible"]:
        assert right <= 1000 and bottom <= 700, f"a control is out of view at 1000x700: {layout}"
    assert measuring is not None, "the page never showed a measured glass-to-glass latency"
    assert samples["frames"] >= 5 and all(0 < x < 5000 for x in samples["samples"]), samples
    assert with_viewer is not None and with_viewer["sessions"] == "1 camera, 1 viewer", with_viewer
    for state in (right_after, later):
        assert all(f == "-" for f in state["fields"]), f"stale figures after Stop: {state['fields']}"
    assert left, "the camera session was not closed after Stop"


async def _cameras_are(url: str, n: int) -> bool:
    return (await get_stats(url))["camera_sessions"] == n
