"""Who may use the server (issue 16, item 2): every route checks Host (DNS rebinding) and Origin (cross-site pages);
/offer takes application/json only; refusals are 403 / 415 with a one-sentence JSON error, and the server keeps
serving. A real cross-origin page in headless Chromium can neither open a session nor read /stats."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from engine.config import StreamConfig
from engine.preview import PreviewRenderer, load_reference
from chromium import CHROMIUM, chromium, open_page
from live_util import get_stats, running_server, wait_for
from streaming.guard import AccessPolicy, split_host
from test_errors import assert_one_sentence



def test_access_policy_by_bind_address():
    loop = AccessPolicy.for_bind("127.0.0.1", 8080)
    for ok in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "LOCALHOST:8080"):
        assert loop.host_ok(ok), ok
    for bad in ("evil.example:8080", "127.0.0.1:8081", "192.168.1.7:8080", "localhost", None, "",
                "localhost:80a", "[::1"):
        assert not loop.host_ok(bad), bad
    lan = AccessPolicy.for_bind("192.168.1.7", 8080, allow_hosts=("studio.lan", "proxy.example:443"))
    assert lan.host_ok("192.168.1.7:8080") and lan.host_ok("studio.lan:8080") and lan.host_ok("proxy.example:443")
    assert not lan.host_ok("localhost:8080") and not lan.host_ok("studio.lan:9000")
    anywhere = AccessPolicy.for_bind("0.0.0.0", 8080)  # any IP literal: a rebinding page always sends a name
    assert anywhere.host_ok("10.1.2.3:8080") and anywhere.host_ok("[fe80::1]:8080")
    assert anywhere.host_ok("localhost:8080") and not anywhere.host_ok("evil.example:8080")
    assert AccessPolicy.for_bind("127.0.0.1", 80).host_ok("localhost")  # the scheme's default port may be left out
    origins = AccessPolicy.for_bind("127.0.0.1", 8080, allow_origins=("http://studio.lan:3000/",))
    assert origins.origin_ok(None, "localhost:8080")  # no Origin: a typed URL, OBS, curl
    assert origins.origin_ok("http://localhost:8080", "localhost:8080")
    assert origins.origin_ok("http://studio.lan:3000", "localhost:8080")
    assert not origins.origin_ok("http://127.0.0.1:8080", "localhost:8080")  # another origin than the page's own
    assert not origins.origin_ok("null", "localhost:8080") and not origins.origin_ok("https://localhost:8080",
                                                                                    "localhost:8080")
    assert split_host("[::1]:99") == ("::1", 99) and split_host("Name") == ("name", None)


def _preview(data):
    reference = load_reference(data("reference", "lp_s6.jpg"))
    return reference, (lambda: PreviewRenderer(reference, 128, 128))


def test_every_route_refuses_foreign_hosts_origins_and_content_types(data):
    reference, make = _preview(data)
    config = StreamConfig(port=0, width=128, height=128, allow_hosts=("studio.lan",),
                          allow_origins=("http://studio.lan:3000",))

    async def scenario():
        async with running_server(config, make, reference, renderer_name="preview") as (server, url):
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            replies = {}
            async with aiohttp.ClientSession() as http:
                async def ask(name, method, path, **kw):
                    async with http.request(method, url + path, **kw) as resp:
                        body = await resp.json(content_type=None)
                        replies[name] = (resp.status, body, resp.headers.get("Content-Type", ""))

                for path in ("", "viewer", "client.js", "stats"):
                    await ask(f"rebinding {path}", "GET", path, headers={"Host": f"evil.example:{port}"})
                    await ask(f"cross-site {path}", "GET", path, headers={"Origin": "http://evil.example"})
                await ask("rebinding offer", "POST", "offer", json={}, headers={"Host": f"evil.example:{port}"})
                await ask("cross-site offer", "POST", "offer", json={"sdp": "v=0", "type": "offer"},
                          headers={"Origin": "http://evil.example"})
                await ask("text/plain offer", "POST", "offer", data='{"sdp": "v=0", "type": "offer"}',
                          headers={"Content-Type": "text/plain"})
                await ask("form offer", "POST", "offer", data={"sdp": "v=0"})
                await ask("wrong port", "GET", "stats", headers={"Host": f"127.0.0.1:{port + 1}"})
                # allowed: loopback names, --allow-host, same origin, --allow-origin (the bad SDP then gives 400)
                for host in (f"localhost:{port}", f"[::1]:{port}", f"studio.lan:{port}"):
                    await ask(f"ok {host}", "GET", "stats", headers={"Host": host})
                await ask("same origin", "POST", "offer", json={"sdp": "v=0", "type": "offer"},
                          headers={"Origin": url.rstrip("/")})
                await ask("allowed origin", "POST", "offer", json={"sdp": "v=0", "type": "offer"},
                          headers={"Origin": "http://studio.lan:3000"})
                await ask("no such page", "GET", "nothing-here")
                await ask("wrong method", "GET", "offer")
                await ask("too large", "POST", "offer", data=b"{" + b" " * (20 * 2**20) + b"}",
                          headers={"Content-Type": "application/json"})
                async with http.get(url) as page:
                    page_status = page.status
            return replies, page_status, await get_stats(url)

    replies, page_status, stats = asyncio.run(scenario())
    for name, (status, body, ctype) in replies.items():
        expected = (403 if name.startswith(("rebinding", "cross-site", "wrong port")) else
                    415 if name in ("text/plain offer", "form offer") else
                    200 if name.startswith("ok ") else
                    400 if name in ("same origin", "allowed origin") else
                    {"no such page": 404, "wrong method": 405, "too large": 413}[name])
        assert status == expected, (name, status, body)
        assert ctype.startswith("application/json"), (name, ctype)
        if status >= 400:
            assert_one_sentence(body["error"])
    assert "Host" in replies["rebinding stats"][1]["error"] and "--allow-host" in replies["rebinding stats"][1]["error"]
    assert "--allow-origin" in replies["cross-site offer"][1]["error"]
    assert "application/json" in replies["text/plain offer"][1]["error"]
    assert page_status == 200 and stats["session_count"] == 0 and stats["sessions_opened"] == 0


ATTACK = """(async () => {
  const target = %r;
  const pc = new RTCPeerConnection({iceServers: []});
  pc.addTransceiver("video", {direction: "recvonly"});
  await pc.setLocalDescription(await pc.createOffer());
  const body = JSON.stringify({sdp: pc.localDescription.sdp, type: "offer"});
  const out = [];
  const tries = [
    ["no-cors text/plain", {method: "POST", mode: "no-cors", body, headers: {"Content-Type": "text/plain"}}],
    ["cors json", {method: "POST", body, headers: {"Content-Type": "application/json"}}],
    ["stats", {}],
  ];
  for (const [name, init] of tries) {
    try {
      const r = await fetch(target + (name === "stats" ? "stats" : "offer"), init);
      let text = null;
      try { text = await r.text(); } catch (e) {}
      out.push([name, r.type, r.status, text]);
    } catch (e) { out.push([name, "blocked", 0, null]); }
  }
  pc.close();
  return out;
})()"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_chromium_page_on_another_origin_gets_no_session_and_no_stats(data, tmp_path):

    reference, make = _preview(data)

    async def scenario():
        async def home(request):
            return web.Response(text="<html><body>another site</body></html>", content_type="text/html")

        other = web.Application()
        other.router.add_get("/", home)
        runner = web.AppRunner(other)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        evil = f"http://localhost:{runner.addresses[0][1]}/"  # another origin (name and port) on this machine
        try:
            async with running_server(StreamConfig(port=0, width=128, height=128), make, reference,
                                      renderer_name="preview") as (server, url):
                async with chromium(tmp_path / "profile") as cdp:
                    target, page = await open_page(cdp, evil)
                    async def loaded():
                        try:  # the context may still be switching from about:blank
                            return await cdp.evaluate(page, f"location.href === {evil!r} && "
                                                            "document.readyState === 'complete'")
                        except RuntimeError:
                            return False

                    assert await wait_for(loaded, 20), "the other origin's page did not load"
                    results = await cdp.evaluate(page, ATTACK % url)
                await asyncio.sleep(0.5)
                return results, await get_stats(url)
        finally:
            await runner.cleanup()

    results, stats = asyncio.run(scenario())
    assert results is not None and len(results) == 3, results
    assert stats["sessions_opened"] == 0 and stats["session_count"] == 0, (results, stats)
    for name, kind, status, text in results:  # nothing readable reached the page
        assert kind in ("blocked", "opaque") or status in (403, 415), (name, kind, status)
        assert not text or "session_count" not in text, (name, text)
