"""Renderers from command-line flags: what `flashlive serve`, `flashlive render` and the benches build.

    make, device = renderer_factory(args, reference, 512, 512, input_queue=4, fps=25.0)   # args: flashlive's flags
    renderer = make()                       # a PreviewRenderer or a FlashPortraitRenderer (one per session)
    idle = idle_image(args.renderer, make, reference, 512, 512)   # shown until the first avatar frame

Flags become the config dataclasses of engine/config.py (`engine_configs`); a missing or broken renderer, a bad
reference image, is one sentence (ValueError).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

BUNDLED_PORTRAIT = Path(__file__).resolve().parent / "assets" / "portrait.jpg"
# Server-side latency target of live flashportrait (capture -> frame sent): WebRTC adds 30-70 ms on loopback (codecs,
# one frame of aiortc's jitter buffer at a client without streaming/jitter.py), so the glass-to-glass p95 stays within
# 0.5 s. With the live window (3, stride 1) it rules out lookahead 1 (4 frames more input wait) unless a window costs
# under ~30 ms; it also bounds the input queue and the lag (engine/renderer.py).
LIVE_LATENCY_TARGET_MS = 350.0


def resolve_fp8(choice: str | None, preset: str, device: str) -> bool:
    """--fp8 auto|on|off -> RuntimeConfig.fp8. auto: on for the 14b preset on a CUDA GPU with FP8 matmuls
    (compute capability 8.9+: Ada, Hopper, Blackwell), off otherwise. on: FP8 anywhere (CPU and older GPUs run
    the same numbers through a dequantized matmul: for checking accuracy, not speed)."""
    choice = choice or "auto"
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--fp8 takes auto, on or off (got {choice!r}).")
    if choice != "auto":
        return choice == "on"
    if preset != "14b" or not device.startswith("cuda"):
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def engine_configs(args) -> dict:
    """The flashportrait configs from flags (unset flags keep the dataclass defaults)."""
    from engine.config import ALPAConfig, RuntimeConfig, SamplerConfig, WindowConfig, get_preset, replace

    runtime = replace(RuntimeConfig(), device=args.device, dtype=args.dtype, compile=args.compile,
                      cuda_graphs=args.compile)
    low_vram = bool(getattr(args, "low_vram", False))
    fp8 = low_vram or resolve_fp8(getattr(args, "fp8", None), args.preset, runtime.device)
    runtime = replace(runtime, fp8=fp8, low_vram=low_vram, emo_refresh=getattr(args, "emo_refresh", None),
                      fp8_scaling=getattr(args, "fp8_scaling", None))
    return {"preset": get_preset(args.preset), "runtime": runtime,
            "sampler": replace(SamplerConfig(), steps=args.steps, fast=args.fast, emo_cfg=args.emo_cfg),
            "window": replace(WindowConfig(), context_size=args.context_size, context_overlap=args.context_overlap),
            "alpa": replace(ALPAConfig(), mode=args.alpa)}


def renderer_factory(args, reference, width: int, height: int, input_queue: int = 4, fps: float = 25.0,
                     offline: bool = False):
    """-> (make_renderer, device name); a missing or broken renderer is one sentence (ValueError).

    offline (flashlive render): the renderer may look at the whole clip before emitting (`flush()`)."""
    if args.renderer == "preview":
        from engine.preview import PreviewRenderer

        return (lambda: PreviewRenderer(reference, width=width, height=height, input_queue=input_queue)), "cpu"
    try:
        from engine.flashportrait import EngineOptions
        from engine.renderer import FlashPortraitRenderer
    except ModuleNotFoundError as err:
        if err.name in ("engine.renderer", "engine.flashportrait"):
            raise ValueError("The flashportrait renderer is not in this installation (engine/renderer.py is "
                             "missing): use --renderer preview or update FlashLive.") from None
        raise ValueError(f"The flashportrait renderer needs the package {err.name!r}: pip install it.") from None
    cfgs = engine_configs(args)
    device = cfgs["runtime"].device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("The flashportrait renderer needs a CUDA GPU and none is visible: use --renderer "
                             "preview, or install the CUDA build of torch (flashlive doctor checks this).")
        device = torch.cuda.get_device_name(torch.device(device))

    options = EngineOptions(**({"decoder": args.decoder} if args.decoder else {}))
    # Live, the controller keeps glass-to-glass near half a second by default (it drops the lookahead and picks a
    # budget for latency while there is real-time headroom); `render` has no latency to keep.
    latency_target_ms = args.latency_target_ms
    if latency_target_ms is None and not offline:
        latency_target_ms = LIVE_LATENCY_TARGET_MS

    def make():
        return FlashPortraitRenderer(reference, weights_dir=args.weights, width=width, height=height,
                                     input_queue=input_queue, random_weights=args.random_weights,
                                     latency_target_ms=latency_target_ms, fps=fps, offline=offline,
                                     options=options, **cfgs)

    return make, device


def warm_start(make) -> float:
    """Build one session and close it before any peer connects: the shared engine loads, compiles, captures and
    times itself; on CUDA the session also rehearses a few live windows (FlashPortraitRenderer.rehearse). Returns
    seconds.

    Why the rehearsal. The first launch of a kernel in a process is slow and stalls other threads' GPU work (CUDA
    loads modules lazily, the default since CUDA 12, and loading synchronizes the context). Without it the first
    session launched the live path's eager kernels (guidance, ALPA, decode) for the first time while a window's DiT
    graph ran: on an H200 at 14b a driving frame's expression waited 197 ms behind window 0's DiT call and 107 ms
    behind window 1's (the renderer's start_expression_ms in bench/results/stream_latency_fp_14b_h200_trace_
    943afdf.json), the next windows' tokens came that much later, and the playout delay kept that start for ~2 s
    (p95 455-675 ms over five runs). With it: 26 ms, p95 418 ms (stream_latency_fp_14b_h200.json)."""
    import time

    t0 = time.perf_counter()
    session = make()
    try:
        device = getattr(getattr(session, "engine", None), "device", None)  # the preview renderer has no engine
        if device is not None and device.type == "cuda":
            session.rehearse()
    finally:
        session.close()
    return time.perf_counter() - t0


def idle_image(renderer: str, make_renderer, reference: np.ndarray, width: int, height: int) -> np.ndarray:
    """The portrait as the avatar frames it, shown until the first avatar frame. For preview, one renderer is built
    up front so a bad reference fails before the server starts; a model renderer is not loaded twice for this."""
    if renderer == "preview":
        preview = make_renderer()
        try:
            return preview.reference
        finally:
            preview.close()
    from engine.flashportrait import fit_reference

    return fit_reference(reference, width, height)


def load_reference(path, renderer: str = "preview"):
    """(H, W, 3) uint8 RGB portrait; None -> the bundled one. A bad file is one sentence (ValueError): a directory,
    not a JPEG/PNG, truncated, or over the pixel limit (checked from its header, before anything decodes it)."""
    from engine.file_check import check_image_file

    if path is not None:
        check_image_file(path)
    try:
        from engine.preview import load_reference as load
    except ImportError as err:  # a GPU box without mediapipe can still run flashportrait, which finds faces itself
        if renderer == "preview":
            raise ValueError(f"The preview renderer needs {err.name}: pip install mediapipe==0.10.21.") from None
        return read_image(path)
    return load(path)


def read_image(path) -> np.ndarray:
    import cv2

    path = str(path or BUNDLED_PORTRAIT)
    if not Path(path).is_file():
        raise ValueError(f"reference image {path} does not exist: pass the path of a portrait JPEG or PNG.")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"reference {path} is not a readable image: pass a portrait as a JPEG or PNG file.")
    return np.ascontiguousarray(bgr[:, :, ::-1])
