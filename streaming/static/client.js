// FlashLive browser client: one RTCPeerConnection to /offer, the avatar in a <video>, stats from /stats.
// Camera page: sends the webcam, receives its avatar. Viewer page (OBS Browser Source): receive-only.
// Glass-to-glass probe (streaming/probe.py): where the browser can edit camera frames (MediaStreamTrackProcessor,
// Chromium), the camera page stamps a frame number into the bottom-left of every frame it sends and notes when;
// the server writes that number into the avatar frame rendered from it; the page reads it back from every avatar
// frame it displays (requestVideoFrameCallback) and has the glass-to-glass latency of each frame.
"use strict";

const flashlive = (() => {
  let pc = null;
  let sessionId = null;
  let statsTimer = null;
  let generation = 0; // bumped by stop(): a stats reply that arrives after Stop is dropped
  const probe = {sent: new Map(), samples: [], shown: 0, lastCode: null, stopCamera: null};
  const BITS = 12, BLOCKS = BITS + 2, PER_WIDTH = 40; // as streaming/probe.py

  function canProbe() {
    return typeof MediaStreamTrackProcessor === "function" && typeof MediaStreamTrackGenerator === "function" &&
      "requestVideoFrameCallback" in HTMLVideoElement.prototype;
  }

  function drawStamp(ctx, width, height, k) {
    const size = width / PER_WIDTH, top = height - Math.round(size);
    for (let b = 0; b < BLOCKS; b++) {
      const white = b === 0 || (b >= 2 && ((k >> (b - 2)) & 1));
      ctx.fillStyle = white ? "#fff" : "#000";
      const x0 = Math.round(b * size), x1 = Math.round((b + 1) * size);
      ctx.fillRect(x0, top, x1 - x0, height - top);
    }
  }

  function stampedCamera(track) {
    // Camera frames -> the same frames with their number in the corner; probe.sent notes when each one left.
    const processor = new MediaStreamTrackProcessor({track, maxBufferSize: 2}); // a slow page drops, never queues
    const generator = new MediaStreamTrackGenerator({kind: "video"});
    let canvas = null, ctx = null, n = 0;
    const stamp = new TransformStream({
      transform(frame, controller) {
        const w = frame.displayWidth, h = frame.displayHeight;
        if (!canvas || canvas.width !== w || canvas.height !== h) {
          canvas = new OffscreenCanvas(w, h);
          ctx = canvas.getContext("2d");
        }
        ctx.drawImage(frame, 0, 0);
        const k = n++ % (1 << BITS);
        drawStamp(ctx, w, h, k);
        probe.sent.set(k, performance.now());
        const out = new VideoFrame(canvas, {timestamp: frame.timestamp});
        frame.close();
        controller.enqueue(out);
      },
    });
    processor.readable.pipeThrough(stamp).pipeTo(generator.writable).catch(() => {});
    probe.stopCamera = () => track.stop();
    return generator;
  }

  function readStamp(ctx, video, width, height) {
    const size = width / PER_WIDTH;
    if (size < 4) return null;
    const w = Math.ceil(BLOCKS * size), h = Math.max(1, Math.round(size));
    ctx.canvas.width = w;
    ctx.canvas.height = h;
    ctx.drawImage(video, 0, height - h, w, h, 0, 0, w, h);
    const data = ctx.getImageData(0, 0, w, h).data;
    const inset = size / 4, values = [];
    for (let b = 0; b < BLOCKS; b++) {
      let sum = 0, count = 0;
      for (let y = Math.round(inset); y < Math.round(h - inset); y++) {
        for (let x = Math.round(b * size + inset); x < Math.round((b + 1) * size - inset); x++) {
          const i = 4 * (y * w + x);
          sum += data[i] + data[i + 1] + data[i + 2];
          count += 3;
        }
      }
      values.push(count ? sum / count : 0);
    }
    if (values[0] < 160 || values[1] > 96) return null;
    let k = 0;
    for (let i = 0; i < BITS; i++) if (values[i + 2] > 128) k |= 1 << i;
    return k;
  }

  function watchAvatar(video) {
    // Every displayed avatar frame: its code -> latency = when it is shown - when that camera frame left.
    const ctx = document.createElement("canvas").getContext("2d", {willReadFrequently: true});
    const mine = generation;
    const onFrame = (now, meta) => {
      if (mine !== generation) return;
      const k = readStamp(ctx, video, meta.width, meta.height);
      if (k !== null && k !== probe.lastCode) {
        const sent = probe.sent.get(k);
        if (sent !== undefined) {
          probe.samples.push(meta.expectedDisplayTime - sent);
          probe.shown++;
        }
        probe.lastCode = k;
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  function percentile(sorted, q) {
    if (!sorted.length) return null;
    const i = Math.min(sorted.length - 1, Math.max(0, Math.round((q / 100) * (sorted.length - 1))));
    return sorted[i];
  }

  // The measured glass-to-glass latency (ms) of every avatar frame shown so far, or of the last `last` ones.
  function latency({last = 0} = {}) {
    const xs = last ? probe.samples.slice(-last) : probe.samples.slice();
    const sorted = xs.slice().sort((a, b) => a - b);
    return {frames: xs.length, p50_ms: percentile(sorted, 50), p95_ms: percentile(sorted, 95), samples: xs,
            measuring: probe.stopCamera !== null};
  }

  function waitForIceGathering(conn) {
    // aiortc does not trickle ICE: send the offer once every local candidate is in it.
    if (conn.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (conn.iceGatheringState === "complete") {
          conn.removeEventListener("icegatheringstatechange", check);
          resolve();
        }
      };
      conn.addEventListener("icegatheringstatechange", check);
      setTimeout(resolve, 3000); // some networks never finish gathering; what we have is enough on a LAN
    });
  }

  async function negotiate(conn, probed = false) {
    await conn.setLocalDescription(await conn.createOffer());
    await waitForIceGathering(conn);
    const offer = {sdp: conn.localDescription.sdp, type: conn.localDescription.type};
    if (probed) offer.probe = true;
    const resp = await fetch("/offer", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(offer),
    });
    const answer = await resp.json();
    if (!resp.ok) throw new Error(answer.error || `server answered ${resp.status}`);
    sessionId = answer.session;
    await conn.setRemoteDescription({sdp: answer.sdp, type: answer.type});
    return answer;
  }

  function newPeer(video) {
    const conn = new RTCPeerConnection({iceServers: []});
    const remote = new MediaStream(); // the avatar and, when the server sends it, the delayed voice: one element
    conn.addEventListener("track", (event) => {
      remote.addTrack(event.track);
      if (video.srcObject !== remote) video.srcObject = remote;
      // Autoplay of a muted video is always allowed; an unmuted one (the viewer page) may be refused: then muted.
      video.play().catch(() => { video.muted = true; video.play().catch(() => {}); });
    });
    window.addEventListener("pagehide", stop);
    return conn;
  }

  async function startCamera(video, preview, {measure = true} = {}) {
    const videoWanted = {width: {ideal: 640}, height: {ideal: 480}, frameRate: {ideal: 30}};
    let camera;
    try { // the microphone comes back delayed by the avatar's latency, in sync with its lips
      camera = await navigator.mediaDevices.getUserMedia({
        video: videoWanted, audio: {echoCancellation: true, noiseSuppression: true}});
    } catch (err) { // no microphone, or not allowed: the avatar alone
      camera = await navigator.mediaDevices.getUserMedia({video: videoWanted, audio: false});
    }
    if (preview) preview.srcObject = new MediaStream(camera.getVideoTracks());
    pc = newPeer(video);
    const probed = measure && canProbe();
    probe.sent.clear();
    probe.samples = [];
    probe.shown = 0;
    probe.lastCode = null;
    for (const track of camera.getTracks()) {
      pc.addTrack(probed && track.kind === "video" ? stampedCamera(track) : track, camera);
    }
    const answer = await negotiate(pc, probed);
    if (probed) watchAvatar(video);
    return answer;
  }

  async function startViewer(video) {
    pc = newPeer(video);
    pc.addTransceiver("video", {direction: "recvonly"});
    pc.addTransceiver("audio", {direction: "recvonly"}); // a --driving file's audio, when the server has one
    return negotiate(pc);
  }

  function stop() {
    generation++;
    if (statsTimer) clearInterval(statsTimer);
    statsTimer = null;
    if (pc) {
      for (const sender of pc.getSenders()) if (sender.track) sender.track.stop();
      pc.close(); // tells the server at once (DTLS close), so it frees the session
    }
    if (probe.stopCamera) probe.stopCamera(); // the camera behind the stamping generator
    probe.stopCamera = null;
    pc = null;
    sessionId = null;
  }

  // Browser-side delays the server cannot see: network round trip, jitter buffer, decode.
  async function browserDelays() {
    const out = {rtt_ms: 0, jitter_ms: 0, decode_ms: 0, fps_shown: 0};
    if (!pc) return out;
    const report = await pc.getStats();
    report.forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
        out.rtt_ms = 1000 * s.currentRoundTripTime;
      }
      if (s.type === "inbound-rtp" && s.kind === "video") {
        if (s.jitterBufferEmittedCount) out.jitter_ms = 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount;
        if (s.framesDecoded) out.decode_ms = 1000 * s.totalDecodeTime / s.framesDecoded;
        out.fps_shown = s.framesPerSecond || 0;
      }
    });
    return out;
  }

  async function readStats() {
    const resp = await fetch("/stats", {cache: "no-store"});
    const all = await resp.json();
    const mine = all.sessions.find((s) => s.id === sessionId) || null;
    return {all, mine, browser: await browserDelays()};
  }

  function watchStats(render, periodMs = 1000) {
    const mine = generation;
    const tick = async () => {
      try {
        const stats = await readStats();
        if (mine === generation) render(stats); // not after Stop: the page has reset its figures
      } catch (err) { /* the server restarted: keep polling */ }
    };
    statsTimer = setInterval(tick, periodMs);
    tick();
  }

  return {startCamera, startViewer, stop, watchStats, readStats, latency, canProbe,
          get sessionId() { return sessionId; }};
})();
