"""Expression extraction speed: ms per frame for the whole PD-FGC extractor and for the FanEncoder alone.

    python bench/expression.py                       # CPU here: mediapipe fallback + random full-size FanEncoder
    python bench/expression.py --device cuda         # GPU: the same, encoder batched on the GPU
    python bench/expression.py --weights DIR         # published face_det/face_landmark/pd_fpg when present
    python bench/expression.py --tiny --frames 8     # smoke test

Part 1 (whole extractor): frames of a real driving video -> landmarks (ONNX pair when found under --weights,
else mediapipe face mesh) -> Umeyama warp -> FanEncoder, timed per frame for push() (one frame at a time, the
live path with no backlog; on CUDA with the encoder's CUDA graph, and as push_eager without it) and push_batch()
over --batch frames (the live path catching up). Skipped, with the
reason in the JSON, when no landmark backend or no video reader (cv2 / av) is installed.
Part 2 (encoder only): FanEncoder forward on random crops at several batch sizes, on the chosen device.
Writes bench/results/expression_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from engine.models.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig  # noqa: E402

DEFAULT_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "driving" / "lp_d0.mp4"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_frames(path: Path, limit: int) -> tuple[list[np.ndarray], str]:
    """Up to `limit` frames and their channel order ("bgr" from cv2, "rgb" from av)."""
    try:
        import cv2

        cap = cv2.VideoCapture(str(path))
        frames = []
        while len(frames) < limit:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
        if frames:
            return frames, "bgr"
    except ImportError:
        pass
    import av

    with av.open(str(path)) as box:
        frames = []
        for frame in box.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == limit:
                break
    return frames, "rgb"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_encoder(encoder: FanEncoder, device: torch.device, dtype: torch.dtype, batches: list[int],
                  iters: int) -> list[dict]:
    rows = []
    for b in batches:
        x = torch.rand(b, 3, 224, 224, device=device, dtype=dtype) * 2 - 1
        with torch.inference_mode():
            for _ in range(2):
                encoder(x)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                encoder(x)
            sync(device)
        ms = (time.perf_counter() - t0) * 1000 / iters
        rows.append({"batch": b, "ms_per_batch": round(ms, 3), "ms_per_frame": round(ms / b, 3)})
        print(f"encoder  batch {b:3d}: {ms:9.2f} ms/batch  {ms / b:8.2f} ms/frame")
    return rows


def bench_extractor(args, encoder: FanEncoder) -> dict:
    try:
        from engine.models.pdfgc.extractor import ExpressionExtractor, make_landmarks
    except ImportError as err:  # cv2 (opencv-contrib-python, installed with mediapipe) missing
        return {"skipped": f"extractor needs {err.name}: {err}"}
    try:
        frames, order = read_frames(Path(args.video), args.frames + args.warmup)
    except Exception as err:  # no cv2 and no av, or an unreadable file
        return {"skipped": f"could not read {args.video}: {type(err).__name__}: {err}"}
    try:
        landmarks = make_landmarks(args.weights, args.backend, static=False,
                                   prefer_cuda=args.device.startswith("cuda"))
    except Exception as err:  # mediapipe not installed and no ONNX weights
        return {"skipped": f"no landmark backend: {type(err).__name__}: {err}"}
    ex = ExpressionExtractor(encoder, landmarks, channel_order=order, max_batch=args.batch,
                             cuda_graph=not args.compile)
    # on CUDA, push() replays a CUDA graph of the encoder; push_eager times the same frames without it
    eager = ExpressionExtractor(encoder, landmarks, channel_order=order, max_batch=args.batch, cuda_graph=False) \
        if ex._graph is not None else None
    if args.compile:  # compile every batch size the timed loops will meet before timing them
        with torch.inference_mode():
            for b in range(1, args.batch + 1):
                encoder(torch.zeros(b, 3, 224, 224, device=ex.device, dtype=ex.dtype))
    out = {"backend": landmarks.name, "frames": len(frames) - args.warmup, "video": Path(args.video).name,
           "frame_shape": list(frames[0].shape)}
    out["cuda_graph"] = ex._graph is not None
    for mode, ex in (("push", ex), ("push_eager", eager), ("push_batch", ex)):
        if ex is None:
            continue
        ex.reset()
        ex.push_batch(frames[:args.warmup])
        ex.frames, ex.faces = 0, 0
        ex.seconds = {k: 0.0 for k in ex.seconds}
        timed = frames[args.warmup:]
        t0 = time.perf_counter()
        if mode != "push_batch":
            found = [ex.push(f).face_found for f in timed]
        else:
            found = [r.face_found for s in range(0, len(timed), args.batch)
                     for r in ex.push_batch(timed[s:s + args.batch])]
        ms = (time.perf_counter() - t0) * 1000 / len(timed)
        stats = ex.stats()
        out[mode] = {"ms_per_frame": round(ms, 3), "faces_found": int(sum(found)),
                     **{k: stats[k] for k in ("landmarks_ms", "align_ms", "encoder_ms")}}
        print(f"extractor {mode:10s}: {ms:8.2f} ms/frame  (landmarks {stats['landmarks_ms']:.2f}, "
              f"align {stats['align_ms']:.2f}, encoder {stats['encoder_ms']:.2f}; faces {sum(found)}/{len(timed)})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--weights", default=None, help="folder with pd_fpg.pth / face_det.onnx / face_landmark.onnx")
    p.add_argument("--backend", choices=["auto", "onnx", "mediapipe"], default="auto")
    p.add_argument("--video", default=str(DEFAULT_VIDEO))
    p.add_argument("--frames", type=int, default=None, help="timed frames (default 24 on CPU, 64 on CUDA)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="push_batch size (the extractor's max_batch)")
    p.add_argument("--encoder-batches", default=None, help="comma list (default 1,8 on CPU, 1,4,8,16,32 on CUDA)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (mode reduce-overhead)")
    p.add_argument("--tiny", action="store_true", help="narrow FanEncoder (smoke test only)")
    p.add_argument("--name", default=None, help="result file name (default expression_<device>)")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.frames = args.frames or (64 if cuda else 24)
    batches = [int(b) for b in (args.encoder_batches or ("1,4,8,16,32" if cuda else "1,8")).split(",")]
    iters = args.iters or (50 if cuda else 2)
    dtype = DTYPES[args.dtype]
    cfg = FanEncoderConfig.tiny() if args.tiny else FanEncoderConfig()

    weights_used = "random"
    if args.weights and not args.tiny:
        try:
            encoder = FanEncoder.from_checkpoint(args.weights, cfg, device, dtype)
            weights_used = "pd_fpg.pth"
        except Exception as err:
            print(f"pd_fpg.pth not used ({err}); timing a random-weight FanEncoder")
            encoder = FanEncoder(cfg).to(device=device, dtype=dtype).eval()
    else:
        encoder = FanEncoder(cfg).to(device=device, dtype=dtype).eval()
    if args.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed 224x224 shapes: pick the fastest conv algorithms once
    if args.compile:
        # One static graph per batch size (all are warmed before timing), so raise dynamo's per-function limit.
        torch._dynamo.config.cache_size_limit = 64
        encoder = torch.compile(encoder, mode="reduce-overhead", dynamic=False)

    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, encoder {'tiny' if args.tiny else 'full'} ({weights_used})")
    extractor = bench_extractor(args, encoder)
    if "skipped" in extractor:
        print(f"extractor skipped: {extractor['skipped']}")
    enc_rows = bench_encoder(encoder, device, dtype, batches, iters)
    payload = {
        "bench": "expression",
        "config": {"device": str(device), "dtype": args.dtype, "encoder": "tiny" if args.tiny else "full",
                   "encoder_weights": weights_used, "encoder_params": sum(p.numel() for p in encoder.parameters()),
                   "torch_threads": torch.get_num_threads(), "channels_last": args.channels_last,
                   "compile": args.compile, "load_average": [round(v, 2) for v in os.getloadavg()],
                   "batch": args.batch, "warmup": args.warmup},
        "extractor": extractor,
        "encoder": enc_rows,
    }
    name = args.name or f"expression_{device.type}{'_tiny' if args.tiny else ''}"
    print(f"wrote {write_result(name, payload)}")


if __name__ == "__main__":
    main()
