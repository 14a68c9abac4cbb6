"""What `flashlive serve` prints: one line per event of its own (sessions opening and closing, a damaged driving
file), and not the native libraries' chatter.

    setup_logging()            # "flashlive.*" loggers at INFO on stderr, everyone else's (aiortc, aioice) at WARNING
    filter_native_stderr()     # file descriptor 2 through a filter that drops mediapipe / TFLite info and warnings

mediapipe's C++ graphs log through absl before absl::InitializeLog(), straight to file descriptor 2 and whatever
GLOG_minloglevel / TF_CPP_MIN_LOG_LEVEL say: 9+ lines for every face-mesh graph, i.e. for every session
("W0000 00:00:1796189818.861375 14781 inference_feedback_manager.cc:114] Feedback manager requires ...", "INFO:
Created TensorFlow Lite XNNPACK delegate for CPU."). `filter_native_stderr` swaps fd 2 for a pipe that a thread
copies to the real stderr line by line, leaving out absl/glog lines of severity I and W and the two banners;
errors (E, F) and everything else pass. At exit the pipe is drained before the process ends (a traceback printed
on the way out still shows).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

NOISE = re.compile(rb"^([IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.\-]+:\d+\] |INFO: Created TensorFlow Lite |"
                   rb"WARNING: All log messages before absl::InitializeLog\(\))")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is at the time of each record (a test may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """One line per record: 'HH:MM:SS flashlive: message' for FlashLive's loggers; others only from WARNING."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s flashlive: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("flashlive")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    logging.basicConfig(level=logging.WARNING)  # aiortc, aioice, aiohttp: their warnings and errors only


_installed = False


def filter_native_stderr() -> None:
    """Route file descriptor 2 through the noise filter (idempotent; Linux and macOS)."""
    global _installed
    if _installed or not hasattr(os, "pipe"):
        return
    _installed = True
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    done = threading.Event()

    def pump() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = b"".join(line + b"\n" for line in lines if not NOISE.match(line))
                if out:
                    os.write(real, out)
        if pending and not NOISE.match(pending):
            os.write(real, pending)
        done.set()

    threading.Thread(target=pump, name="stderr-filter", daemon=True).start()

    def restore() -> None:  # at exit: close the pipe's last writer (fd 2), let the thread copy what is left
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)
        done.wait(2.0)

    atexit.register(restore)
