"""The renderer interface every renderer (preview, FlashPortrait) shares, and its worker thread.

    renderer.push(frame, pts)   # frame (H, W, 3) uint8 RGB driving frame, pts in seconds; never blocks
    renderer.pull()             # -> (frame (out_h, out_w, 3) uint8 RGB, pts) or None; never blocks
    renderer.stats()            # -> dict of plain numbers/strings for /stats

The asyncio side only calls these three. Work happens in `process()` on the renderer's own thread. The input
queue is bounded: when the renderer is behind, the oldest driving frame is dropped (and counted), so latency
never grows without bound. The output queue is bounded too; sinks pace it.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np


class ThreadedRenderer:
    """Base class: subclasses implement `process(frame, pts) -> list[(frame, pts)]` (zero or more outputs)."""

    name = "base"

    def __init__(self, input_queue: int = 4, output_queue: int = 64):
        self._in: collections.deque = collections.deque(maxlen=input_queue)
        self._out: collections.deque = collections.deque(maxlen=output_queue)
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.dropped_in = 0
        self.dropped_out = 0
        self.process_ms = 0.0  # exponential moving average of process() time
        self.error: str | None = None

    # --- the three calls of the asyncio side ----------------------------------------------------------------------
    def push(self, frame: np.ndarray, pts: float) -> None:
        with self._cv:
            if len(self._in) == self._in.maxlen:
                self.dropped_in += 1
            self._in.append((frame, pts))
            self.frames_in += 1
            self._cv.notify()

    def pull(self):
        try:
            return self._out.popleft()
        except IndexError:
            return None

    def stats(self) -> dict:
        return {"renderer": self.name, "frames_in": self.frames_in, "frames_out": self.frames_out,
                "dropped_in": self.dropped_in, "dropped_out": self.dropped_out, "input_queue": len(self._in),
                "output_queue": len(self._out), "process_ms": round(self.process_ms, 2), "error": self.error}

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> "ThreadedRenderer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"renderer-{self.name}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # --- subclass hooks -------------------------------------------------------------------------------------------
    def process(self, frame: np.ndarray, pts: float) -> list:
        """Render one driving frame; return the output frames that became ready, as (frame, pts) pairs."""
        raise TypeError(f"{type(self).__name__} must implement process(frame, pts)")

    def _emit(self, outputs) -> None:
        for item in outputs:
            if len(self._out) == self._out.maxlen:
                self.dropped_out += 1
            self._out.append(item)
            self.frames_out += 1

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._in and not self._stop:
                    self._cv.wait(0.5)
                if self._stop:
                    return
                frame, pts = self._in.popleft()
            t0 = time.perf_counter()
            try:
                outputs = self.process(frame, pts)
            except Exception as err:  # keep serving: a bad frame must not kill the session
                self.error = f"{type(err).__name__}: {err}"
                continue
            dt = (time.perf_counter() - t0) * 1e3
            self.process_ms = dt if self.process_ms == 0 else 0.9 * self.process_ms + 0.1 * dt
            self._emit(outputs)
