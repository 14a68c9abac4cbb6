"""The FlashPortrait engine: models, conditioning and the compiled DiT step, shared by every session of a process.

    engine = FlashPortraitEngine.shared(reference, weights_dir, 512, 512, preset=get_preset("1.3b"), ...)
    engine.warm_up()                                  # load, build conditioning, compile, capture: seconds
    engine.measured_costs()                           # one guided DiT call and one latent decode, timed once

`FlashPortraitEngine` is shared per process (one per distinct set of arguments): it owns every model (loaded once
from `weights_dir`, or built with random weights at the preset's size for `random_weights=True`, which the stats
say), the per-reference conditioning (CLIP tokens, the VAE latent of [reference, zeros...] and the first-frame
mask: the 36-channel input's last 20 channels `y`, built once and reused by every window, so each window's first
latent frame is flagged as the reference), the prompt context (engine/models/text.py's on-disk cache; random weights: a
fixed random context) and the fixed-shape DiT step (kernels/graphs.CompiledStep: compiled + CUDA graph on CUDA,
eager on CPU). A lock serialises the DiT work of the sessions that share it.

The per-peer session that runs windows on it is `engine/renderer.py` (FlashPortraitRenderer).
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.alpa import CachedDiT, DifferenceTable
from engine.config import ALPAConfig, ModelPreset, RuntimeConfig, SamplerConfig, WindowConfig, get_preset
from engine.sampler import DISTILLED_TIMESTEPS, distilled_schedule, flow_schedule
from engine.weights import WeightsError, find_file

TIME_STRIDE = 4  # video frames per latent frame (Wan VAE / TAEHV)
DEFAULT_PROMPT = "A person is talking to the camera, natural facial expressions, high quality portrait video."


@dataclass
class EngineOptions:
    """Engine choices beyond the config dataclasses."""

    decoder: str = "tiny"  # tiny (TAEHV, real-time) | wan (full Wan VAE)
    prompt: str = DEFAULT_PROMPT
    prompt_cache: str = "~/.cache/flashlive/prompts"
    expression_backend: str = "auto"  # PD-FGC landmarks: auto | onnx | mediapipe
    step_delay_s: float = 0.0  # test hook: sleep this long in every full DiT pass (an artificially slowed step)
    seed: int = 0
    landmarks: object = None  # a factory () -> landmarks object (five_points, channel_order, reset); default PD-FGC's


def fit_reference(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (height, width, 3): scaled to cover, centre crop (what `flashlive serve` shows idle)."""
    import cv2

    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    resized = cv2.resize(image, (max(width, round(w * scale)), max(height, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    y0, x0 = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return np.ascontiguousarray(resized[y0:y0 + height, x0:x0 + width])


def make_schedule_for(sampler: SamplerConfig, steps: int):
    """The live schedule with `steps` steps: the distilled one (a subset of its timesteps when fewer) or the
    shifted flow-matching Euler schedule."""
    if sampler.fast:
        if steps >= len(DISTILLED_TIMESTEPS):
            return distilled_schedule(DISTILLED_TIMESTEPS, sampler.shift)
        picks = [round(1000 - i * 1000 / steps) for i in range(steps)]  # evenly from 1000: (1000, 500) for 2
        return distilled_schedule(picks, sampler.shift)
    return flow_schedule(steps, sampler.shift)


class _StepCachedDiT(CachedDiT):
    """CachedDiT whose full passes at the compiled window shape run the engine's CompiledStep.

    Only the output-feature cache (ALPAConfig.cache = "output") is fed from the compiled step (the flow is all it
    keeps); layer caches and TeaCache run CachedDiT's eager passes. `delay_s` sleeps in every full pass (test hook).
    """

    def __init__(self, model, schedule, cfg, options=None, step=None, ip_scale=None, delay_s: float = 0.0):
        super().__init__(model, schedule, cfg, options)
        self.step, self.ip_step, self.delay_s = step, ip_scale, delay_s

    def _full(self, st, x, step, ctx_img, ctx_txt, y, emo, ip_scale, record: bool):
        if self.delay_s:
            time.sleep(self.delay_s)
        compiled = self.step
        if compiled is None or tuple(x.shape) != tuple(compiled.x.shape) or (record and self.cfg.cache == "layers"):
            return super()._full(st, x, step, ctx_img, ctx_txt, y, emo, ip_scale, record)
        flow = compiled(x, self._timestep(step, x.shape[0], x.device), emo, self.ip_step)
        if record:
            if st.table is None:
                st.table = DifferenceTable(1, self.cfg.order, self.opt.expansion, self.opt.cache_dtype)
            st.table.begin(step)
            st.table.update(0, flow)
            if self.cfg.mode == "alpa":  # one feature: the cross-layer weight is 1, as CachedDiT does for "output"
                st.s_anchor, st.scale, st.sqrt_r = st.rate.s, None, None
        return flow


class FlashPortraitEngine:
    """Models, conditioning and the compiled step, shared by every session of one process (see module docstring).

    reference (H, W, 3) uint8 RGB; width/height of the output (multiples of 16); preset: ModelPreset or name;
    runtime / sampler / window / alpa: the config dataclasses; random_weights: build every network at the preset's
    size with random weights (timing and tests; nothing is read from `weights_dir`).
    """

    _shared: dict = {}
    _shared_lock = threading.Lock()

    def __init__(self, reference: np.ndarray, weights_dir=None, width: int = 512, height: int = 512, *,
                 preset: ModelPreset | str = "tiny", runtime: RuntimeConfig | None = None,
                 sampler: SamplerConfig | None = None, window: WindowConfig | None = None,
                 alpa: ALPAConfig | None = None, random_weights: bool = False, options: EngineOptions | None = None):
        if width % 16 or height % 16:
            raise ValueError(f"The flashportrait renderer needs a size divisible by 16 (got {width}x{height}): "
                             f"pass --size 512x512 or another multiple of 16.")
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.runtime = runtime or RuntimeConfig()
        self.sampler_cfg = sampler or SamplerConfig()
        self.window_cfg = window or WindowConfig()
        self.alpa_cfg = alpa or ALPAConfig()
        self.options = options or EngineOptions()
        if self.options.decoder not in ("tiny", "wan"):
            raise ValueError(f"Unknown decoder {self.options.decoder!r}: use --decoder tiny (TAEHV) or wan (Wan VAE).")
        self.random_weights = random_weights
        self.weights_dir = weights_dir
        self.width, self.height = width, height
        self.device = torch.device(self.runtime.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("The flashportrait renderer needs a CUDA GPU and none is visible: pass --device cpu "
                             "(slow) or use --renderer preview.")
        # bf16 on CPU is slow and not what tests compare: the CPU path computes in fp32.
        self.dtype = self.runtime.torch_dtype if self.device.type == "cuda" else torch.float32
        W, O = self.window_cfg.context_size, self.window_cfg.context_overlap
        if not 0 < W or not 0 <= O < W:
            raise ValueError(f"The window needs 0 <= overlap < size (got size {W}, overlap {O}): pass "
                             f"--context-size and --context-overlap accordingly.")
        self.reference = fit_reference(reference, width, height)
        self.lock = threading.RLock()  # GPU work of the sessions sharing this engine, one at a time
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # rolling windows
        self.loaded = False
        self.warm_up_s: float | None = None
        self.timings: dict = {}  # measured_costs(): seconds of one DiT call and of one latent frame's decode
        self.sessions = 0  # open renderer sessions (close() decrements)
        self.notes: list[str] = []

    # --- sharing -------------------------------------------------------------------------------------------------
    @classmethod
    def shared(cls, reference: np.ndarray, weights_dir=None, width: int = 512, height: int = 512,
               **kwargs) -> "FlashPortraitEngine":
        """One engine per distinct (reference, weights, size, configs) in this process."""
        ref = np.ascontiguousarray(reference)
        key = (hashlib.sha1(ref.tobytes()).hexdigest(), ref.shape, str(weights_dir), width, height,
               repr(sorted((k, repr(v)) for k, v in kwargs.items())))
        with cls._shared_lock:
            engine = cls._shared.get(key)
            if engine is None:
                engine = cls._shared[key] = cls(ref, weights_dir, width, height, **kwargs)
            return engine

    @classmethod
    def release_all(cls) -> None:
        """Forget the shared engines (their models are freed once no session holds them)."""
        with cls._shared_lock:
            cls._shared.clear()

    # --- loading -------------------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """Batch of one DiT call: the two guidance branches run as one batch of 2 when emo_cfg > 1."""
        return 2 if self.sampler_cfg.emo_cfg > 1.0 else 1

    def warm_up(self) -> float:
        """Load every model, build the conditioning and the compiled step, compile and capture; returns seconds."""
        with self.lock:
            if self.warm_up_s is not None:
                return self.warm_up_s
            t0 = time.perf_counter()
            self._load()
            self._build_conditioning()
            self._build_step()
            if self.step is not None and self.step.use_graph:
                self.step.write_inputs(self.step.x, 1000.0, self.step.emo, self.ip_scale_step)
                self.step.capture()
            self._sync()
            self.warm_up_s = time.perf_counter() - t0
            return self.warm_up_s

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measured_costs(self) -> dict:
        """{"pass_s", "decode_latent_s"}: timed once, by the first live session (serve's warm start, before any
        peer), then shared; offline rendering never needs them."""
        with self.lock:
            if not self.timings:
                self.warm_up()
                self.timings = self._measure_costs()
            return self.timings

    @torch.no_grad()
    def _measure_costs(self, repeats: int = 3) -> dict:
        """Seconds of one guided DiT call at the window shape (`pass_s`) and of decoding one latent frame to host
        frames (`decode_latent_s`), medians on the warm engine. The budget controller starts from them (see
        `window_ms_per_unit`); the first decode also takes the decoder's one-off costs out of the first window."""
        def median_s(fn) -> float:
            times = []
            for _ in range(repeats + 1):  # the first call may still select kernels
                self._sync()
                t0 = time.perf_counter()
                fn()
                self._sync()
                times.append(time.perf_counter() - t0)
            return sorted(times[1:])[len(times[1:]) // 2]

        x = torch.randn(self.step.x.shape, device=self.device, generator=torch.Generator(self.device).manual_seed(0))
        pass_s = median_s(lambda: self.step(x, 1000.0, self.step.emo, self.ip_scale_step))
        decoder = self.make_decoder()
        z = torch.randn((1, 16, 1, *self.latent_hw), device=self.device).to(self.dtype)
        decoder.decode(z)  # a stream's first latent is 1 frame; later ones are 4
        decode_s = median_s(lambda: frames_uint8(decoder.decode(z)))
        return {"pass_s": pass_s, "decode_latent_s": decode_s}

    def window_ms_per_unit(self, budget) -> float:
        """The controller's cost of one unit (engine/controller.py) predicted from the warm-up timings for `budget`:
        its full DiT calls, its predicted steps at a tenth of a call each, and the decode of its stride."""
        t = self.measured_costs()
        full = budget.full_passes()
        window_s = (full + 0.1 * (budget.steps - full)) * t["pass_s"] + budget.stride * t["decode_latent_s"]
        return 1e3 * window_s / budget.units()

    def _load(self) -> None:
        if self.loaded:
            return
        from engine.models.clip_vision import ClipVision, load_clip_vision
        from engine.models.dit import WanModel
        from engine.models.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig
        from engine.models.portrait_encoder import PortraitEncoder
        from engine.models.tiny_vae import TinyVAE, load_tiny_vae
        from engine.models.vae import WanVAE, load_vae
        from engine.weights import load_dit, load_portrait_encoder

        p, dev, dt = self.preset, self.device, self.dtype
        fan_cfg = FanEncoderConfig.tiny() if p.name == "tiny" else FanEncoderConfig()
        wd = self.weights_dir
        if self.random_weights:
            torch.manual_seed(self.options.seed)
            with torch.device(dev):
                self.dit = WanModel(p.dit).to(dt).eval().requires_grad_(False)
                self.portrait = PortraitEncoder(p.portrait).to(dt).eval().requires_grad_(False)
                self.fan = FanEncoder(fan_cfg).to(dt).eval().requires_grad_(False)
                self.clip = ClipVision(p.clip).to(dt).eval().requires_grad_(False)
                self.vae = WanVAE(p.vae).to(dt).eval().requires_grad_(False)
                self.tiny_vae = TinyVAE(p.tiny_vae, encoder=False).to(dt).eval().requires_grad_(False)
            self.context = torch.randn(1, p.dit.text_len, p.dit.text_dim, device=dev, dtype=dt,
                                       generator=torch.Generator(dev).manual_seed(self.options.seed + 1))
            self.notes.append("random weights: every network is randomly initialised (timing only, output is noise)")
        else:
            self.dit = load_dit(wd, p.dit, dtype=dt, device=dev)
            if self.sampler_cfg.fast:
                try:
                    from engine.lora import load_and_merge_lora

                    lora = find_file(wd, "fast_lora_rank64.safetensors", "4-step distillation LoRA")
                    load_and_merge_lora(self.dit, lora)
                    self.notes.append(f"merged {lora.name}")
                except WeightsError as err:
                    self.notes.append(f"no distillation LoRA ({err}); the 4-step schedule runs on the base DiT")
            self.portrait = load_portrait_encoder(wd, p.portrait, dtype=dt, device=dev)
            self.fan = FanEncoder.from_checkpoint(wd, fan_cfg, dev, dt)
            self.clip = load_clip_vision(wd, p.clip, device=dev, dtype=dt)
            self.vae = load_vae(wd, p.vae, device=dev, dtype=dt)
            self.tiny_vae = None
            if self.options.decoder == "tiny":
                try:
                    self.tiny_vae = load_tiny_vae(wd, p.tiny_vae, device=dev, dtype=dt)
                except WeightsError as err:
                    self.notes.append(f"no tiny VAE ({err}); decoding with the Wan VAE")
            from engine.models.text import PromptEncoder

            prompts = PromptEncoder(wd, Path(self.options.prompt_cache).expanduser(), p.t5, device=dev, dtype=dt)
            self.context = prompts.encode(self.options.prompt)[None]
        self.loaded = True

    @torch.no_grad()
    def _build_conditioning(self) -> None:
        """CLIP tokens, y = [mask 4 | VAE latent of (reference, zeros...)] over one window, and context K/V."""
        W = self.window_cfg.context_size
        img = torch.from_numpy(self.reference).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1
        self.clip_fea = self.clip.encode(img.to(self.dtype))                                 # (1, 257, 1280)
        ref_lat = self.vae.encode_reference(img.to(self.dtype), W).float()                    # (1, 16, W, h, w)
        mask = torch.zeros_like(ref_lat[:, :4])
        mask[:, :, 0] = 1.0  # Wan's I2V mask: the first latent frame is the given image
        self.y = torch.cat([mask, ref_lat], dim=1)                                             # (1, 20, W, h, w)
        self.latent_hw = tuple(ref_lat.shape[-2:])
        B = self.batch
        ctx_img, ctx_txt = self.dit.embed_context(self.context, self.clip_fea)
        self.ctx_img = ctx_img.expand(B, -1, -1).contiguous()
        self.ctx_txt = ctx_txt.expand(B, -1, -1).contiguous()
        self.kv = self.dit.context_kv(self.ctx_img, self.ctx_txt)
        self.y_batch = self.y.expand(B, -1, -1, -1, -1).contiguous()
        self.ip_scale = torch.tensor([1.0, 0.0][:B], device=self.device)                  # per-sample (B,)

    def _build_step(self) -> None:
        from kernels.graphs import StepShape
        from engine.distributed import make_step  # CompiledStep; on rank 0 of several GPUs (--gpus N), ParallelStep

        h, w = self.latent_hw
        shape = StepShape(self.batch, self.window_cfg.context_size, h, w)
        self.step = make_step(self.dit, shape, self.runtime)
        # The guidance pair runs as one batch: ip_scale per sample, 1 (emotion branch) and 0 (no-emotion branch).
        self.ip_scale_step = self.ip_scale
        self.step.set_session(None, None, self.y_batch, kv=self.kv)

    @property
    def live_steps(self) -> int:
        """Sampler steps of the full budget: the distilled schedule's 4 (or fewer when `steps` says so), else
        `steps` of the flow-matching schedule."""
        s = self.sampler_cfg
        return min(s.steps, len(DISTILLED_TIMESTEPS)) if s.fast else s.steps

    # --- per-session helpers ---------------------------------------------------------------------------------------
    def cached_dit(self, schedule, alpa: ALPAConfig) -> "_StepCachedDiT":
        return _StepCachedDiT(self.dit, schedule, alpa, step=self.step, ip_scale=self.ip_scale_step,
                              delay_s=self.options.step_delay_s)

    def guided_flow(self, cached: CachedDiT, x: torch.Tensor, i: int, emo: torch.Tensor, key) -> torch.Tensor:
        """Guided flow (1, 16, n, h, w) of step i: both guidance branches as one batch of 2 through `cached`.

        x (1, 16, n, h, w) latent, emo (1, n, 97, emo_dim) tokens. The pair shares one ALPA cache key: the
        difference tables are elementwise, so each batch element (branch) keeps its own trajectory.
        """
        n, B = x.shape[2], self.batch
        y = self.y_batch if n == self.y_batch.shape[2] else self.y_batch[:, :, :n]
        flows = cached(x.expand(B, -1, -1, -1, -1), i, self.ctx_img, self.ctx_txt, y,
                       emo.expand(B, -1, -1, -1), ip_scale=self.ip_scale if B > 1 else 1.0, key=key, kv=self.kv)
        if B == 1:
            return flows
        emo_flow, no_emo = flows[:1], flows[1:]
        return no_emo + self.sampler_cfg.emo_cfg * (emo_flow - no_emo)

    def make_decoder(self):
        from engine.models.tiny_vae import StreamingTinyDecoder
        from engine.models.vae import StreamingDecoder

        if self.options.decoder == "tiny" and self.tiny_vae is not None:
            return StreamingTinyDecoder(self.tiny_vae)
        return StreamingDecoder(self.vae)

    def make_extractor(self):
        from engine.models.pdfgc.extractor import ExpressionExtractor, make_landmarks

        if self.options.landmarks is not None:
            landmarks = self.options.landmarks()
        else:
            try:
                landmarks = make_landmarks(None if self.random_weights else self.weights_dir,
                                           self.options.expression_backend, prefer_cuda=self.device.type == "cuda")
            except ImportError as err:
                raise ValueError(f"Expression extraction needs face_det.onnx + face_landmark.onnx in the weights "
                                 f"folder or the mediapipe fallback ({err.name} is missing): pip install "
                                 f"mediapipe==0.10.21.") from None
        return ExpressionExtractor(self.fan, landmarks, channel_order="rgb")

    def stats(self) -> dict:
        return {"preset": self.preset.name, "random_weights": self.random_weights, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "batch": self.batch,
                "compiled": bool(getattr(getattr(self, "step", None), "compiled", False)),
                "cuda_graph": bool(getattr(getattr(self, "step", None), "use_graph", False)),
                "warm_up_s": None if self.warm_up_s is None else round(self.warm_up_s, 2),
                "warm_up_pass_ms": round(1e3 * self.timings["pass_s"], 2) if self.timings else None,
                "warm_up_decode_latent_ms": round(1e3 * self.timings["decode_latent_s"], 2) if self.timings else None,
                "decoder": "tiny" if self.options.decoder == "tiny" and getattr(self, "tiny_vae", None) is not None
                else "wan", "sessions": self.sessions, "notes": self.notes}


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, f, H, W) in [-1, 1] -> (f, H, W, 3) uint8 on the host (one copy)."""
    return video[0].permute(1, 2, 3, 0).add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
