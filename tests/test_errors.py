"""Bad input gives one clear sentence (CLI: exit 1; HTTP: 400 with the message) and the server keeps serving."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCPeerConnection, VideoStreamTrack
from aiortc.contrib.media import MediaPlayer

import flashlive
from engine.config import StreamConfig
from engine.preview import PreviewRenderer, load_reference
from live_util import get_stats, post_offer, running_server, wait_for

ROOT = Path(__file__).resolve().parents[1]


def assert_one_sentence(message: str) -> None:
    message = message.strip()
    assert message, "no message"
    assert "\n" not in message and "Traceback" not in message, message
    assert message.endswith("."), message
    assert len(message) < 400, message


@pytest.fixture
def bad_inputs(tmp_path) -> dict:
    no_face = tmp_path / "landscape.png"
    rng = np.random.default_rng(0)
    sky = np.linspace(80, 220, 256, dtype=np.uint8)[:, None, None].repeat(256, 1).repeat(3, 2)
    cv2.imwrite(str(no_face), cv2.GaussianBlur(sky + rng.integers(0, 20, sky.shape, np.uint8), (9, 9), 0))
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a picture\n")
    return {"no face": (no_face, "no face"), "not an image": (not_image, "not a readable image"),
            "missing": (tmp_path / "missing.jpg", "does not exist")}


@pytest.mark.parametrize("case", ["no face", "not an image", "missing"])
def test_render_bad_reference(case, bad_inputs, data, capsys, tmp_path):
    path, words = bad_inputs[case]
    out = tmp_path / "out.mp4"
    code = flashlive.main(["render", "--driving", str(data("driving", "lp_d0.mp4")), "--reference", str(path),
                           "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert words in err, err
    assert_one_sentence(err.split(": ", 1)[1])
    assert not out.exists()


def test_render_bad_driving(bad_inputs, data, capsys, tmp_path):
    reference = str(data("reference", "lp_s6.jpg"))
    for driving, words in [(tmp_path / "none.mp4", "does not exist"), (bad_inputs["not an image"][0], "as a video")]:
        code = flashlive.main(["render", "--driving", str(driving), "--reference", reference, "-q",
                               "-o", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err
        assert code == 1 and words in err, err
        assert_one_sentence(err.split(": ", 1)[1])


def test_serve_cli_errors_exit_nonzero(bad_inputs):
    """Through the real entry point (a subprocess): exit code 1, one line on stderr, no traceback."""
    run = subprocess.run([sys.executable, "-m", "flashlive", "serve", "--reference", str(bad_inputs["no face"][0])],
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("flashlive serve:")]
    assert run.returncode == 1, run.stderr[-1500:]
    assert len(lines) == 1 and "no face" in lines[0], run.stderr[-1500:]
    assert "Traceback" not in run.stderr
    assert_one_sentence(lines[0].split(": ", 1)[1])


def test_serve_port_in_use_and_missing_renderer(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, words in [(["--port", str(port)], "in use"), (["--renderer", "flashportrait"], "flashportrait"),
                            (["--port", "0", "--record", "/nonexistent-folder/show.mp4"], "does not exist")]:
            code = flashlive.main(["serve", *args])
            err = capsys.readouterr().err
            lines = [ln for ln in err.splitlines() if ln.startswith("flashlive serve:")]
            assert code == 1 and len(lines) == 1 and words in lines[0], err
            assert_one_sentence(lines[0].split(": ", 1)[1])


def test_bad_offers_get_400_and_server_keeps_serving(data):
    reference = load_reference(data("reference", "lp_s6.jpg"))
    make = lambda: PreviewRenderer(reference, 128, 128)  # noqa: E731

    async def scenario():
        async with running_server(StreamConfig(port=0, width=128, height=128), make, reference,
                                  renderer_name="preview") as (server, url):
            replies = []
            async with aiohttp.ClientSession() as http:
                bodies = [
                    {"data": b"not json at all", "headers": {"Content-Type": "application/json"}},
                    {"data": "[" * 100_000 + "]" * 100_000, "headers": {"Content-Type": "application/json"}},
                    {"json": {"sdp": 42, "type": "offer"}},
                    {"json": {"sdp": "garbage", "type": "offer"}},
                    {"json": {"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "type": "offer"}},
                    {"json": {"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                                     "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "type": "offer"}},
                ]
                for body in bodies:
                    async with http.post(url + "offer", **body) as resp:
                        replies.append((resp.status, await resp.json()))
            assert (await get_stats(url))["session_count"] == 0, "a rejected offer left a session behind"

            # Still serving: a real client connects and gets avatar frames.
            player = MediaPlayer(str(data("driving", "lp_d0.mp4")))
            pc = RTCPeerConnection()
            pc.addTrack(player.video)
            tracks = []
            pc.on("track", tracks.append)
            await post_offer(url, pc)
            await wait_for(lambda: asyncio.sleep(0, tracks), 10)
            frames = [await asyncio.wait_for(tracks[0].recv(), 15) for _ in range(5)]
            await pc.close()
            player.video.stop()
            return replies, frames

    replies, frames = asyncio.run(scenario())
    for status, body in replies:
        assert status == 400, (status, body)
        assert_one_sentence(body["error"])
    assert "SDP" in replies[3][1]["error"] and "SDP" in replies[5][1]["error"]
    assert all(f.width == 128 and f.height == 128 for f in frames)


def test_renderer_failure_is_503_and_frees_everything(data):
    reference = load_reference(data("reference", "lp_s6.jpg"))

    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    async def scenario():
        async with running_server(StreamConfig(port=0, width=128, height=128), out_of_memory, reference,
                                  renderer_name="flashportrait") as (server, url):
            pc = RTCPeerConnection()
            pc.addTrack(VideoStreamTrack())
            await pc.setLocalDescription(await pc.createOffer())
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                    reply = (r.status, await r.json())
            await pc.close()
            return reply, await get_stats(url)

    (status, body), stats = asyncio.run(scenario())
    assert status == 503 and "out of memory" in body["error"]
    assert_one_sentence(body["error"])
    assert stats["session_count"] == 0
