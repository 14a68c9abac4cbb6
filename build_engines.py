"""Ahead-of-time builds of the fixed-shape DiT step, kept in a compiled-artifact cache folder.

    python build_engines.py --preset tiny --frames 3 --size 64             # ONNX export + onnxruntime check (CPU)
    python build_engines.py --preset 1.3b --frames 6 --tensorrt            # + TensorRT engine (CUDA + TensorRT)
    python build_engines.py --preset 1.3b --frames 6 --inductor            # + torch.compile artifacts (CUDA)

Each build is one folder `<cache>/<preset>_b<B>_f<F>_<H>x<W>_<dtype>/` holding `step.onnx` (+ external weight
files above 2 GB), `step.engine` (TensorRT) or `step.ts` (torch-tensorrt), `inductor.bin` (torch.compile cache
artifacts, loaded back with `load_inductor_cache`) and `meta.json` (shapes, versions, ONNX parity). A folder is
written under a temporary name and renamed when complete, so a crash never leaves half an artifact in the cache.

The exported graph is the step CompiledStep runs: inputs x (B, 16, F, H, W) fp32, t (B,) fp32, emo (B, F, 97,
emo_dim), ip_scale (B,) fp32 -> flow (B, 16, F, H, W) fp32, with the session constants (per-block context K/V, y,
RoPE tables) and the weights baked in as initializers. Weights come from --weights (a Wan/FlashPortrait DiT state
dict) or are random (seeded) for shape and speed work.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from engine.config import DiTConfig, get_preset, parse_dtype
from engine.models.dit import WanModel
from kernels import fused
from kernels.graphs import StepShape, step_forward

DEFAULT_CACHE = Path(__file__).resolve().parent / "build" / "engines"
OPSET = 17
TENSORRT_MISSING = ("TensorRT is not installed, so no engine was built: install `pip install torch-tensorrt tensorrt` "
                    "(NVIDIA's wheels, from NVIDIA's package index) on a CUDA machine and run this again.")
INPUT_NAMES = ["x", "t", "emo", "ip_scale"]


class ExportStep(nn.Module):
    """The fixed-shape step as a module for exporters: forward(x, t, emo, ip_scale) -> flow (B, 16, F, H, W) fp32.

    Session constants (context K/V of every block, y, RoPE cos/sin) are computed once here and held as buffers.
    """

    def __init__(self, model: WanModel, shape: StepShape, context: torch.Tensor, clip_fea: torch.Tensor,
                 y: torch.Tensor, frame_offset: int = 0):
        super().__init__()
        self.model = model.eval()
        self.shape = shape
        device = model.patch_embedding.weight.device
        with torch.no_grad():
            ctx_img, ctx_txt = model.embed_context(context, clip_fea)
            for i, block in enumerate(model.blocks):
                for name, value in zip(("k_img", "v_img", "k_txt", "v_txt"),
                                       block.cross_attn.context_kv(ctx_img, ctx_txt)):
                    self.register_buffer(f"kv{i}_{name}", value.contiguous())
            cos, sin = model.rope(shape.grid(model.cfg.patch_size), device, frame_offset=frame_offset)
        self.register_buffer("cos", cos.clone())
        self.register_buffer("sin", sin.clone())
        self.register_buffer("y", y.clone())

    def kvs(self):
        return [tuple(getattr(self, f"kv{i}_{n}") for n in ("k_img", "v_img", "k_txt", "v_txt"))
                for i in range(len(self.model.blocks))]

    def forward(self, x, t, emo, ip_scale):
        return step_forward(self.model, x, self.y, t, self.cos, self.sin, self.kvs(), emo, ip_scale)


def random_model(cfg: DiTConfig, device, dtype, seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    with torch.device(device):
        return WanModel(cfg).to(dtype).eval().requires_grad_(False)


def example_session(cfg: DiTConfig, shape: StepShape, device, dtype, seed: int = 0):
    """Seeded random (context, clip_fea, y) and call inputs (x, t, emo, ip_scale) of the right shapes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, F, H, W = shape.batch, shape.frames, shape.height, shape.width

    def rnd(*s, dt=torch.float32):
        return torch.randn(*s, generator=g).to(device=device, dtype=dt)

    session = (rnd(B, cfg.text_len, cfg.text_dim), rnd(B, cfg.clip_tokens, cfg.clip_dim),
               rnd(B, cfg.in_dim - cfg.out_dim, F, H, W))
    inputs = (rnd(B, cfg.out_dim, F, H, W), torch.linspace(900.0, 300.0, B, device=device),
              rnd(B, F, cfg.emo_tokens_per_frame, cfg.emo_dim, dt=dtype), torch.ones(B, device=device))
    return session, inputs


def artifact_key(preset: str, shape: StepShape, dtype: torch.dtype) -> str:
    return f"{preset}_b{shape.batch}_f{shape.frames}_{shape.height}x{shape.width}_{str(dtype).removeprefix('torch.')}"


class ArtifactDir:
    """Write into `<cache>/.<key>.tmp-<pid>`, then rename onto `<cache>/<key>` (replacing an older build)."""

    def __init__(self, cache: Path, key: str):
        self.final = Path(cache) / key
        self.tmp = Path(cache) / f".{key}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        if self.final.exists():  # keep what an earlier build made (e.g. ONNX) when only adding an engine
            for item in self.final.iterdir():
                if item.is_file():
                    shutil.copy2(item, self.tmp / item.name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
        if self.final.exists():
            self.final.rename(old)
        self.tmp.rename(self.final)
        shutil.rmtree(old, ignore_errors=True)
        return False


@torch.no_grad()
def export_onnx(step: ExportStep, inputs: tuple, path: Path) -> Path:
    """Export with the TorchScript-based exporter (no onnxscript needed), opset 17, torch kernels only."""
    with fused.fused_kernels(False):  # Triton kernels are opaque to exporters: trace the reference ops
        torch.onnx.export(step, inputs, str(path), opset_version=OPSET, dynamo=False, input_names=INPUT_NAMES,
                          output_names=["flow"], do_constant_folding=True)
    return path


@torch.no_grad()
def verify_onnx(step: ExportStep, inputs: tuple, path: Path) -> dict:
    """Run the ONNX file in onnxruntime on CPU and compare with the torch step on the same inputs."""
    import numpy as np
    import onnxruntime as ort

    with fused.fused_kernels(False):
        ref = step(*inputs).float().cpu().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for meta, value in zip(sess.get_inputs(), inputs):
        feeds[meta.name] = value.float().cpu().numpy() if value.dtype == torch.bfloat16 else value.cpu().numpy()
    out = sess.run(None, feeds)[0]
    err = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    return {"max_abs_diff": err, "max_abs_ref": scale, "ok": bool(err <= 1e-3 * max(1.0, scale))}


def build_tensorrt(step: ExportStep, inputs: tuple, folder: Path, dtype: torch.dtype) -> str:
    """TensorRT engine through torch-tensorrt (preferred) or the TensorRT builder on the ONNX file; returns what was
    built, or TENSORRT_MISSING."""
    try:
        import torch_tensorrt
    except ImportError:
        torch_tensorrt = None
    if torch_tensorrt is not None:
        with fused.fused_kernels(False):
            trt_module = torch_tensorrt.compile(step, ir="dynamo", inputs=list(inputs),
                                                enabled_precisions={dtype}, min_block_size=1)
            torch_tensorrt.save(trt_module, str(folder / "step.ts"), inputs=list(inputs))
        return "step.ts (torch-tensorrt)"
    try:
        import tensorrt as trt
    except ImportError:
        return TENSORRT_MISSING
    onnx_path = folder / "step.onnx"
    if not onnx_path.exists():
        export_onnx(step, inputs, onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    flag = {torch.bfloat16: "BF16", torch.float16: "FP16"}.get(dtype)
    if flag and hasattr(trt.BuilderFlag, flag):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT failed to build the engine; rerun with a smaller --frames or check its log.")
    (folder / "step.engine").write_bytes(bytes(engine))
    return "step.engine (TensorRT builder)"


def build_inductor(model: WanModel, shape: StepShape, session: tuple, inputs: tuple, folder: Path) -> str:
    """Compile and capture the CompiledStep once, then save torch.compile's cache artifacts for a fast restart."""
    from engine.config import RuntimeConfig
    from kernels.graphs import CompiledStep

    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return f"torch {torch.__version__} cannot save compile artifacts (needs torch >= 2.7)"
    step = CompiledStep(model, shape, RuntimeConfig(device=str(inputs[0].device)))
    step.set_session(*session)
    step(inputs[0], inputs[1], inputs[2], 1.0)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return "torch.compile produced no cache artifacts"
    (folder / "inductor.bin").write_bytes(saved[0])
    return "inductor.bin"


def load_inductor_cache(folder: str | Path) -> bool:
    """Load torch.compile artifacts saved by `build_engines.py --inductor` before building a CompiledStep; returns
    whether anything was loaded (a missing file is not an error: compiling from scratch is the fallback)."""
    path = Path(folder) / "inductor.bin"
    if not path.exists() or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True


def build(preset: str, shape: StepShape, dtype: torch.dtype, device: str, cache: Path, weights: str | None = None,
          onnx: bool = True, verify: bool | None = None, tensorrt: bool = False, inductor: bool = False,
          log=print) -> dict:
    """Build the requested artifacts for one preset and shape; returns the meta dict written beside them."""
    cfg = get_preset(preset).dit
    model = random_model(cfg, device, dtype)
    if weights:
        from engine.weights import load_into, load_state_dict

        load_into(model, load_state_dict(weights))
    session, inputs = example_session(cfg, shape, device, dtype)
    step = ExportStep(model, shape, *session)
    meta = {"preset": preset, "shape": vars(shape), "dtype": str(dtype), "torch": torch.__version__,
            "weights": weights or "random (seed 0)", "opset": OPSET, "built": {}}
    if verify is None:
        verify = sum(p.numel() for p in model.parameters()) < 50_000_000  # onnxruntime on CPU: small models only
    with ArtifactDir(cache, artifact_key(preset, shape, dtype)) as folder:
        if onnx:
            t0 = time.perf_counter()
            export_onnx(step, inputs, folder / "step.onnx")
            meta["built"]["onnx"] = f"step.onnx ({time.perf_counter() - t0:.1f} s)"
            log(f"exported {artifact_key(preset, shape, dtype)}/step.onnx")
            if verify:
                meta["onnx_check"] = verify_onnx(step, inputs, folder / "step.onnx")
                log(f"onnxruntime vs torch: {meta['onnx_check']}")
        if tensorrt:
            meta["built"]["tensorrt"] = build_tensorrt(step, inputs, folder, dtype)
            log(meta["built"]["tensorrt"])
        if inductor:
            meta["built"]["inductor"] = build_inductor(model, shape, session, inputs, folder)
            log(meta["built"]["inductor"])
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta["folder"] = str(Path(cache) / artifact_key(preset, shape, dtype))
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the fixed-shape DiT step: ONNX, TensorRT, torch.compile cache.")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--frames", type=int, default=3, help="latent frames per window")
    p.add_argument("--size", type=int, default=512, help="video width = height in pixels (latent = size / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--weights", default=None, help="DiT state dict (Wan key names); random weights when omitted")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="compiled-artifact cache folder")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--verify", action="store_true", help="check the ONNX file in onnxruntime even for big models")
    p.add_argument("--tensorrt", action="store_true")
    p.add_argument("--inductor", action="store_true", help="save torch.compile artifacts of the CUDA step")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if args.inductor and device != "cuda":
        p.error("--inductor builds the CUDA step: run it on a CUDA machine.")
    shape = StepShape.from_video(args.size, args.size, args.frames, batch=args.batch)
    meta = build(args.preset, shape, dtype, device, Path(args.cache), args.weights, onnx=not args.no_onnx,
                 verify=True if args.verify else None, tensorrt=args.tensorrt, inductor=args.inductor)
    print(f"artifacts in {meta['folder']}")
    check = meta.get("onnx_check")
    return 1 if check is not None and not check["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
