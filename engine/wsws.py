"""Weighted sliding windows (WSWS) over latent frames: (a) offline step-major, as FlashPortrait runs it, and
(b) a causal rolling window for streaming.

(a) Offline, step-major (`plan_windows`, `wsws_sample`)
    Windows of `size` latent frames start at 0 with stride = size - overlap, for starts < length - overlap; the last
    window is then pinned to [length - size, length) (a video no longer than `size` is one window of its own
    length). At every step every window reads the global latents of the previous step, runs its DiT passes and
    guidance (the `denoise` callback) and its scheduler step; the windows are processed in order and each writes
    its post-step latents into the global buffer, later windows overwriting earlier ones. From the second step on
    (not at step 0), the first L frames of window k (L = frames shared with window k - 1) are blended with the
    global buffer, which at that moment holds window k-1's post-step latents there:
        cur[j] = w_j * cur[j] + (1 - w_j) * prev[j],  w_j = j / (L - 1), j = 0..L-1
    (the upstream code divides by zero for L = 1; we use w = 0.5 there). RoPE positions are local to the window:
    the callback sees a window-sized latent and runs the DiT on it exactly as on a short video.
    Conditioning is also per window upstream: every window's first latent frame carries the reference-image
    flag of the (window-sized) y, and its expression tokens are those of a clip starting there. FlashPortrait's
    long-video pipeline encodes window [s, e) of latent frames from its own video frames 4s .. 4(e-1) and groups
    them into 97 tokens per latent frame exactly as training groups a clip: latent 0 of the window gets the 24
    tokens of its first frame 4s plus 73 zero pads, latent j >= 1 the tokens of frames 4(s+j)-4 (its last token
    only) .. 4(s+j). In the global accounting (latent 0 = frame 0, latent i >= 1 = frames 4i-3..4i) the window's
    first frame 4s is the LAST frame of latent s, so, the encoder being per frame, latents j >= 1 keep their
    global 97 tokens and only latent s changes: cat(cond[s][-24:], zeros(73)) for s >= 1, and latent 0 as it is
    for s = 0. It never gets 97 real tokens. `wsws_sample` passes the global slice as `cond`; the caller builds
    the window's layout (engine/models/portrait_encoder.window_latent_tokens), as FlashPortraitRenderer does in
    both paths: offline per window here, live per rolling window in (b) (every window's first latent frame).

(b) Rolling, window-major (`RollingWSWS`)
    A fixed window of `size` frames advances by stride S = size - overlap: window k covers [kS, kS + size). It
    can start once the conditioning (expression tokens) of its last frame has arrived, and runs all steps at once.
    Its first `overlap` frames start from the same initial noise as in window k-1 and, from the second step on,
    after every scheduler step they are blended with the same weights toward window k-1's latents *stored at
    that step* (window k-1's post-step, post-blend latents of its last `overlap` frames). When window k finishes,
    its first S frames are final (no later window touches them) and leave at once; its last `overlap` frames and
    their per-step latents are kept for window k+1. `flush()` releases the held frames at the end of a stream.
    Every window has the same shape, so one compiled DiT step (and its CUDA graph) serves the whole stream.

Where (b) differs from (a)
    * Information flows one way. In (a) window k-1 at step i+1 reads the global buffer, in which its last L frames
      were just overwritten by window k's blend: the previous window sees the future window at every step. In (b)
      window k-1 is finished before window k exists, so window k-1's last frames follow their own trajectory and
      window k alone reconciles them. The outputs are equal whenever that back-coupling cannot matter:
        - a single window (length <= size): no blending at all;
        - a one-step schedule: no blending happens at step 0 in either;
        - a denoiser without cross-window coupling (per frame and independent of the frame's window position):
          both windows then produce the same value for a shared frame, so every blend is the identity.
      With a coupled denoiser (attention over the window, local RoPE) they differ. Measured in
      `tests/test_wsws.py` on a deterministic toy denoiser (3-frame smoothing across the window + a term of the
      local frame position, 10 Euler steps, size 6, overlap 3, 21 frames): ||b - a|| / ||a|| = 0.26, against 1.53
      for a hard cut (no blending) vs (a); seam jump (mean temporal step at overlaps / elsewhere) 0.59 for (a),
      0.76 for (b), 1.30 for the hard cut. So (b) keeps the seams smooth but is not a drop-in for (a)'s output.
    * The pinned last window of (a) needs the video length in advance; (b) never pins: the stream length is
      unknown, all windows share one stride, and the tail frames leave through `flush()`.
    * Latency and memory: (b) emits S frames per window after `steps` x passes DiT calls on `size` frames; it keeps
      two buffers of (steps + 1) x overlap frames (the previous window's initial noise and per-step latents, read,
      and the current window's, written).
      (a) keeps the whole video's latents and emits nothing until the last step.
    * LightX2V-style "renoise" steps draw fresh noise per window in both; which draw a frame gets differs, so (a)
      and (b) agree only in distribution there. The equality statements above hold for the deterministic steps
      ("euler", and FlashPortrait's "distill").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.sampler import Sampler


@dataclass(frozen=True)
class Window:
    """Latent frames [start, end) of the global video; the first `overlap` are shared with the previous window."""

    index: int
    start: int
    end: int
    overlap: int

    @property
    def size(self) -> int:
        return self.end - self.start


def window_starts(length: int, size: int, overlap: int) -> list[int]:
    """FlashPortrait's window starts: range(0, length - overlap, size - overlap), last one pinned to length - size."""
    if length < 1 or size < 1:
        raise ValueError(f"length and size must be positive (got length {length}, size {size}).")
    if not 0 <= overlap < size:
        raise ValueError(f"context_overlap must be in [0, context_size) (got {overlap} for size {size}).")
    if length <= size:
        return [0]
    starts = list(range(0, length - overlap, size - overlap))
    starts[-1] = length - size
    return starts


def plan_windows(length: int, size: int, overlap: int) -> list[Window]:
    """The windows of (a), each with its overlap L with the previous window (0 for the first)."""
    starts = window_starts(length, size, overlap)
    n = min(size, length)
    wins = []
    for k, s in enumerate(starts):
        prev_end = starts[k - 1] + n if k else s
        wins.append(Window(k, s, s + n, max(0, prev_end - s)))
    return wins


def blend_weights(n: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_j = j / (n - 1), j = 0..n-1, shaped (n, 1, 1) to broadcast over (frames, H, W); 0.5 when n == 1."""
    if n == 1:
        return torch.full((1, 1, 1), 0.5, device=device, dtype=dtype)
    return (torch.arange(n, device=device, dtype=torch.float64) / (n - 1)).to(dtype).view(n, 1, 1)


def blend_(cur: torch.Tensor, prev: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """In place on cur (B, C, L, H, W): cur = w * cur + (1 - w) * prev, computed in fp32."""
    cur.copy_(cur.float() * weights + prev.float() * (1 - weights))
    return cur


# Denoise callback: (x (B, C, n, H, W) window latents, step index, window, cond (n, ...) or None) -> flow, x's shape.
Denoise = Callable[[torch.Tensor, int, Window, "torch.Tensor | None"], torch.Tensor]


def wsws_sample(noise: torch.Tensor, sampler: Sampler, denoise: Denoise, size: int, overlap: int,
                cond: torch.Tensor | None = None, blend: bool = True) -> torch.Tensor:
    """(a) Offline step-major WSWS. noise (B, C, T, H, W) initial latents; cond (T, ...) per-latent-frame
    conditioning sliced per window for `denoise` (or None). Returns the final latents (B, C, T, H, W).
    `blend=False` is the hard-cut ablation (later windows simply overwrite)."""
    T = noise.shape[2]
    windows = plan_windows(T, size, overlap)
    latents = noise.clone()
    pred = torch.empty_like(latents)
    weights = {w.overlap: blend_weights(w.overlap, noise.device) for w in windows if w.overlap}
    for i in range(len(sampler)):
        for w in windows:
            x = latents[:, :, w.start:w.end]
            flow = denoise(x, i, w, None if cond is None else cond[w.start:w.end])
            out = sampler.step(i, x, flow)
            if blend and w.index > 0 and i > 0 and w.overlap > 0:
                L = w.overlap
                blend_(out[:, :, :L], pred[:, :, w.start:w.start + L], weights[L])
            pred[:, :, w.start:w.end] = out
        latents, pred = pred, latents
    return latents


class RollingWSWS:
    """(b) Causal rolling WSWS for a stream of latent frames.

        roll = RollingWSWS(sampler, size=6, overlap=3, frame_shape=(1, 16, 64, 64), device="cuda")
        roll.push(tokens_of_latent_frame)          # any per-frame conditioning, e.g. (97, 2048) expression tokens
        while roll.ready():
            final = roll.run(denoise)              # (B, C, S, H, W) latent frames that are final, S = size - overlap
        tail = roll.flush()                        # (B, C, overlap, H, W) at the end of the stream

    denoise(x (B, C, size, H, W), step, window, cond (size, ...)) -> flow (B, C, size, H, W); window carries the
    global frame indices, so a caller that keeps its own conditioning may ignore `cond` (and push None).
    noise_fn(start, n) -> (B, C, n, H, W) gives the initial noise of global latent frames [start, start + n)
    (default: torch.randn on `device` from `generator`, drawn in frame order).
    """

    def __init__(self, sampler: Sampler, size: int, overlap: int, frame_shape: tuple[int, int, int, int],
                 device=None, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                 noise_fn: Callable[[int, int], torch.Tensor] | None = None, blend: bool = True):
        if not 0 <= overlap < size:
            raise ValueError(f"context_overlap must be in [0, context_size) (got {overlap} for size {size}).")
        self.sampler, self.size, self.overlap, self.stride = sampler, size, overlap, size - overlap
        self.blend = blend
        B, C, H, W = frame_shape
        self.device, self.dtype = device, dtype
        self._noise_fn = noise_fn or (lambda s, n: torch.randn((B, C, n, H, W), generator=generator,
                                                               device=device, dtype=torch.float32).to(dtype))
        steps = len(sampler)
        self.x = torch.empty((B, C, size, H, W), device=device, dtype=dtype)
        # (steps + 1) x overlap frames: index 0 the initial noise, index i + 1 the latents after step i.
        self._store = torch.empty((steps + 1, B, C, overlap, H, W), device=device, dtype=dtype)
        self._prev = torch.empty_like(self._store)
        self._weights = blend_weights(overlap, device) if overlap else None
        self._cond: list = []  # conditioning of frames from self.window_start on
        self.window_index = 0  # next window to run
        self.frames_out = 0  # latent frames released so far
        self._held = False  # the last window's tail is held for the next window

    @property
    def window_start(self) -> int:
        return self.window_index * self.stride

    def push(self, cond) -> None:
        """Conditioning of the next latent frame (in order)."""
        self._cond.append(cond)

    def ready(self) -> bool:
        """True when every frame of the next window has its conditioning."""
        return len(self._cond) >= self.size

    def next_window(self) -> Window:
        k = self.window_index
        return Window(k, self.window_start, self.window_start + self.size, self.overlap if k else 0)

    def run(self, denoise: Denoise) -> torch.Tensor:
        """Run every step of the next window; returns its final frames (B, C, stride, H, W)."""
        if not self.ready():
            raise RuntimeError(f"window {self.window_index} needs {self.size} frames of conditioning, "
                               f"{len(self._cond)} pushed: call ready() before run().")
        win = self.next_window()
        O, S = self.overlap, self.stride
        first = win.index == 0
        self._prev, self._store = self._store, self._prev  # the previous window's store becomes read-only
        x = self.x
        if first:
            x.copy_(self._noise_fn(win.start, self.size))
        else:
            if O:
                x[:, :, :O].copy_(self._prev[0])
            x[:, :, O:].copy_(self._noise_fn(win.start + O, S))
        if O:
            self._store[0].copy_(x[:, :, S:])
        cond = self._stack_cond()
        for i in range(len(self.sampler)):
            flow = denoise(x, i, win, cond)
            x.copy_(self.sampler.step(i, x, flow))
            if self.blend and not first and i > 0 and O:
                blend_(x[:, :, :O], self._prev[i + 1], self._weights)
            if O:
                self._store[i + 1].copy_(x[:, :, S:])
        del self._cond[:S]
        self.window_index += 1
        self.frames_out += S
        self._held = True
        return x[:, :, :S].clone()

    def flush(self) -> torch.Tensor:
        """The held last `overlap` frames of the last window (B, C, overlap, H, W); empty if nothing is held.
        Frames pushed after the last full window are not rendered: to end a stream on a partial window, push
        padding conditioning (e.g. the last frame repeated) until ready(), run it, and drop the padded frames."""
        if not self._held:
            return self.x[:, :, :0].clone()
        self._held = False
        self.frames_out += self.overlap
        return self.x[:, :, self.stride:].clone()

    def _stack_cond(self):
        frames = self._cond[:self.size]
        if frames and all(isinstance(c, torch.Tensor) for c in frames):
            return torch.stack(frames)
        return None if all(c is None for c in frames) else frames


def seam_jump(latents: torch.Tensor, windows: list[Window]) -> float:
    """Mean temporal step |z[f+1] - z[f]| over frame pairs touching a window overlap, divided by the mean over
    all other pairs: about 1 for a seamless video, large for a hard cut. latents (B, C, T, H, W)."""
    d = (latents[:, :, 1:].float() - latents[:, :, :-1].float()).abs().mean(dim=(0, 1, 3, 4))  # (T - 1,)
    seam = torch.zeros_like(d, dtype=torch.bool)
    for w in windows[1:]:
        lo, hi = max(w.start - 1, 0), min(w.start + max(w.overlap, 1), d.shape[0])
        seam[lo:hi] = True
    if seam.all() or not seam.any():
        return 1.0
    return float(d[seam].mean() / d[~seam].mean())
