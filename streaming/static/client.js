// FlashLive browser client: one RTCPeerConnection to /offer, the avatar in a <video>, stats from /stats.
// Camera page: sends the webcam, receives its avatar. Viewer page (OBS Browser Source): receive-only.
"use strict";

const flashlive = (() => {
  let pc = null;
  let sessionId = null;
  let statsTimer = null;

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

  async function negotiate(conn) {
    await conn.setLocalDescription(await conn.createOffer());
    await waitForIceGathering(conn);
    const resp = await fetch("/offer", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({sdp: conn.localDescription.sdp, type: conn.localDescription.type}),
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

  async function startCamera(video, preview) {
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
    for (const track of camera.getTracks()) pc.addTrack(track, camera);
    return negotiate(pc);
  }

  async function startViewer(video) {
    pc = newPeer(video);
    pc.addTransceiver("video", {direction: "recvonly"});
    pc.addTransceiver("audio", {direction: "recvonly"}); // a --driving file's audio, when the server has one
    return negotiate(pc);
  }

  function stop() {
    if (statsTimer) clearInterval(statsTimer);
    statsTimer = null;
    if (pc) {
      for (const sender of pc.getSenders()) if (sender.track) sender.track.stop();
      pc.close(); // tells the server at once (DTLS close), so it frees the session
    }
    pc = null;
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
    const tick = async () => {
      try { render(await readStats()); } catch (err) { /* the server restarted: keep polling */ }
    };
    statsTimer = setInterval(tick, periodMs);
    tick();
  }

  return {startCamera, startViewer, stop, watchStats, readStats, get sessionId() { return sessionId; }};
})();
