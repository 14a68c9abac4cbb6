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

Speed and memory for the 14b preset: runtime.fp8 quantizes the DiT block linears inside the compiled step
(kernels/fp8.py); with guidance on and runtime.emo_refresh > 1 (engine/guidance.py) a second, batch-1 step (the
expression branch alone) shares the pair step's CUDA graph pool and the live windows compute the no-expression
branch only at one expression full pass in emo_refresh; runtime.low_vram builds the DiT block by block into FP8 and
releases CLIP and the Wan VAE after the conditioning (engine/low_vram.py).

The per-peer session that runs windows on it is `engine/renderer.py` (FlashPortraitRenderer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
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

MINI_SIZE = 128  # the mini preset's training resolution
QUALITY_LADDER_FILE = "quality_ladder.json"  # bench/speed_quality.py --ladder-out: measured budget quality
log = logging.getLogger("flashlive.engine")  # warm-up progress: serve prints it

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
    """CachedDiT whose full passes at the compiled window shape run the engine's CompiledSteps.

    Only the output-feature cache (ALPAConfig.cache = "output") is fed from the compiled steps (the flow is all it
    keeps); layer caches and TeaCache run CachedDiT's eager passes. `step` runs the guidance pair (batch 2, or the
    only branch when guidance is off), `single` (guidance economy) the expression branch alone (batch 1). With
    `pair_request` set, a batch-1 full pass runs the pair instead, records the expression half in the ALPA cache
    and leaves the no-expression half in `pair_no_emo` (engine/guidance.py). `delay_s` sleeps in every full pass
    (test hook).
    """

    def __init__(self, model, schedule, cfg, options=None, step=None, ip_scale=None, delay_s: float = 0.0,
                 single=None):
        super().__init__(model, schedule, cfg, options)
        self.step, self.ip_step, self.delay_s, self.single = step, ip_scale, delay_s, single
        self.pair_request = False
        self.pair_no_emo: torch.Tensor | None = None

    def will_run_full(self, step: int, key) -> bool | None:
        """Whether the call for `step` under `key` will run a full pass (None: TeaCache decides during the call)."""
        if self.cfg.mode == "teacache":
            return None
        st = self._state.get(key)
        return st is None or step <= st.last_step or st.table is None or self.is_full_step(step)

    def _full(self, st, x, step, ctx_img, ctx_txt, y, emo, ip_scale, record: bool):
        if self.delay_s:
            time.sleep(self.delay_s)
        self.pair_no_emo = None
        if self.pair_request and x.shape[0] == 1:
            pair = (2, *x.shape[1:])
            flows = self.step(x.expand(pair), self._timestep(step, 2, x.device), emo.expand(2, *emo.shape[1:]),
                              self.ip_step)
            flow, self.pair_no_emo = flows[:1], flows[1:]
        else:
            compiled = self.single if x.shape[0] == 1 and self.single is not None else self.step
            if compiled is None or tuple(x.shape) != tuple(compiled.x.shape) or \
                    (record and self.cfg.cache == "layers"):
                return super()._full(st, x, step, ctx_img, ctx_txt, y, emo, ip_scale, record)
            flow = compiled(x, self._timestep(step, x.shape[0], x.device), emo,
                            1.0 if compiled is self.single else self.ip_step)
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
        if self.preset.autoencoder is not None and (width, height) != (MINI_SIZE, MINI_SIZE):
            raise ValueError(f"The {self.preset.name} preset renders {MINI_SIZE}x{MINI_SIZE} (what it was trained at, "
                             f"got {width}x{height}): pass --size {MINI_SIZE}x{MINI_SIZE}.")
        self.runtime = runtime or RuntimeConfig()
        if self.runtime.fp8_scaling not in ("rowwise", "tensorwise"):
            raise ValueError(f"Unknown FP8 scaling {self.runtime.fp8_scaling!r}: pass --fp8-scaling rowwise or "
                             f"tensorwise.")
        if self.runtime.low_vram and not self.runtime.fp8:
            self.runtime = dataclasses.replace(self.runtime, fp8=True)  # the 24 GB mode is the FP8 DiT
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
        self.quality: dict | None = None  # measured budget quality for the controller's ladder (see _load_mini)
        self.warm_up_s: float | None = None
        self.timings: dict = {}  # measured_costs(): seconds of one DiT call and of one latent frame's decode
        self.sessions = 0  # open renderer sessions (close() decrements)
        self.notes: list[str] = []
        self.peak_load_bytes: int | None = None  # device memory allocated at the peak of warm_up (CUDA)
        self.released: list[str] = []  # networks freed after the conditioning (low_vram)
        self.step1 = None  # the expression branch alone (batch 1), when the guidance economy runs
        from engine.distributed import world_size
        from engine.guidance import auto_refresh

        refresh = self.runtime.emo_refresh
        self.emo_refresh = auto_refresh(self.preset.name, self.sampler_cfg.emo_cfg, world_size()) \
            if refresh is None else max(1, int(refresh))

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
            log.info("warm-up: loading and compiling %s%s", self.preset.name, " (random weights)" * self.random_weights)
            self._load()
            self._build_conditioning()
            self._build_step()
            if self.runtime.low_vram:
                from engine.low_vram import release_encoders

                self.released = release_encoders(self)
            self._sync()
            if self.device.type == "cuda":
                self.peak_load_bytes = torch.cuda.max_memory_allocated(self.device)
            self.warm_up_s = time.perf_counter() - t0
            return self.warm_up_s

    @property
    def economy(self) -> bool:
        """Whether the live path runs the guidance economy (engine/guidance.py): guidance on, refresh > 1."""
        return self.step1 is not None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measured_costs(self) -> dict:
        """{"pass_s", "decode_latent_s"}: timed once, by the first live session (serve's warm start, before any
        peer), then shared; offline rendering never needs them."""
        with self.lock:
            if not self.timings:
                self.warm_up()
                log.info("warm-up: timing one DiT call and one decode (the budget controller's start)")
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
        pair_s = median_s(lambda: self.step(x, 1000.0, self.step.emo, self.ip_scale_step))
        costs = {"pair_pass_s": pair_s}
        pass_s = pair_s
        if self.step1 is not None:
            single_s = median_s(lambda: self.step1(x[:1], 1000.0, self.step1.emo, 1.0))
            n = self.emo_refresh
            pass_s = (pair_s + (n - 1) * single_s) / n  # one expression full pass on the economy's schedule
            costs["single_pass_s"] = single_s
        decoder = self.make_decoder()
        z = torch.randn((1, 16, 1, *self.latent_hw), device=self.device).to(self.dtype)
        decoder.decode(z)  # a stream's first latent is 1 frame; later ones are 4
        decode_s = median_s(lambda: frames_uint8(decoder.decode(z)))
        return {"pass_s": pass_s, "decode_latent_s": decode_s, **costs}

    def window_ms_per_unit(self, budget) -> float:
        """The controller's cost of one unit (engine/controller.py) predicted from the warm-up timings for `budget`:
        its full DiT calls (an expression full pass: the pair, or with the guidance economy the average of its pair
        and single passes), its predicted steps at a tenth of a call each, and the decode of its stride."""
        t = self.measured_costs()
        full = budget.full_passes()
        window_s = (full + 0.1 * (budget.steps - full)) * t["pass_s"] + budget.stride * t["decode_latent_s"]
        return 1e3 * window_s / budget.units()

    def _load(self) -> None:
        if self.loaded:
            return
        from engine.models.clip_vision import ClipVision, load_clip_vision
        from engine.models.pdfgc.fan_encoder import FanEncoder, FanEncoderConfig
        from engine.models.portrait_encoder import PortraitEncoder
        from engine.models.tiny_vae import TinyVAE, load_tiny_vae
        from engine.models.vae import WanVAE, load_vae
        from engine.weights import load_dit, load_portrait_encoder

        p, dev, dt = self.preset, self.device, self.dtype
        fan_cfg = FanEncoderConfig.tiny() if p.name == "tiny" else FanEncoderConfig()
        wd = self.weights_dir
        self.expression = None
        if p.autoencoder is not None:
            self._load_mini()
        elif self.random_weights:
            from engine.low_vram import random_dit_blockwise

            # WanModel's own random weights, made module by module on the device (no fp32 copy of all 14B
            # parameters); low_vram: each block goes to FP8 before the next exists. Same seed, same weights.
            torch.manual_seed(self.options.seed)
            self.dit = random_dit_blockwise(p.dit, dev, dt, fp8=self.runtime.low_vram,
                                            rowwise=self.runtime.fp8_scaling != "tensorwise")
            with torch.device(dev):
                self.portrait = PortraitEncoder(p.portrait).to(dt).eval().requires_grad_(False)
                self.fan = FanEncoder(fan_cfg).to(dt).eval().requires_grad_(False)
                self.clip = ClipVision(p.clip).to(dt).eval().requires_grad_(False)
                self.vae = WanVAE(p.vae).to(dt).eval().requires_grad_(False)
                self.tiny_vae = TinyVAE(p.tiny_vae, encoder=False).to(dt).eval().requires_grad_(False)
            self.context = torch.randn(1, p.dit.text_len, p.dit.text_dim, device=dev, dtype=dt,
                                       generator=torch.Generator(dev).manual_seed(self.options.seed + 1))
            self.notes.append("random weights: every network is randomly initialised (timing only, output is noise)")
        else:
            from engine.models.text import PromptEncoder

            def encode_prompt():  # umT5-XXL (11 GB in bf16) only when the prompt is not in the on-disk cache
                prompts = PromptEncoder(wd, Path(self.options.prompt_cache).expanduser(), p.t5, device=dev, dtype=dt)
                self.context = prompts.encode(self.options.prompt)[None]

            if self.runtime.low_vram:  # umT5 is gone before the DiT arrives
                encode_prompt()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            # low_vram: loaded on the CPU, then moved block by block into FP8 (after the LoRA merge, below)
            self.dit = load_dit(wd, p.dit, dtype=dt, device="cpu" if self.runtime.low_vram else dev)
            if self.sampler_cfg.fast:
                try:
                    from engine.lora import load_and_merge_lora

                    lora = find_file(wd, "fast_lora_rank64.safetensors", "4-step distillation LoRA")
                    load_and_merge_lora(self.dit, lora)
                    self.notes.append(f"merged {lora.name}")
                except WeightsError as err:
                    self.notes.append(f"no distillation LoRA ({err}); the 4-step schedule runs on the base DiT")
            if self.runtime.low_vram:
                from engine.low_vram import place_dit

                place_dit(self.dit, dev, fp8=True, rowwise=self.runtime.fp8_scaling != "tensorwise")
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
            if not self.runtime.low_vram:
                encode_prompt()
        self.loaded = True

    def _load_mini(self) -> None:
        """The trained `mini` preset (engine/mini.py): its own autoencoder decodes, face-mesh landmarks through its
        expression encoder stand in for PD-FGC, its text context is one stored tensor. No FanEncoder, no TAEHV."""
        from engine.mini import load_mini
        from engine.models.clip_vision import ClipVision
        from engine.models.dit import WanModel
        from engine.models.mini_expression import LandmarkExpressionEncoder
        from engine.models.mini_vae import MiniVAE
        from engine.models.portrait_encoder import PortraitEncoder

        p, dev, dt = self.preset, self.device, self.dtype
        self.fan = self.tiny_vae = None
        if self.random_weights:
            torch.manual_seed(self.options.seed)
            with torch.device(dev):
                self.dit = WanModel(p.dit).to(dt).eval().requires_grad_(False)
                self.portrait = PortraitEncoder(p.portrait).to(dt).eval().requires_grad_(False)
                self.expression = LandmarkExpressionEncoder(p.landmark_expression, p.portrait).to(dt).eval()
                self.clip = ClipVision(p.clip).to(dt).eval().requires_grad_(False)
                self.vae = MiniVAE(p.autoencoder).to(dt).eval().requires_grad_(False)
            self.context = torch.randn(1, p.dit.text_len, p.dit.text_dim, device=dev, dtype=dt,
                                       generator=torch.Generator(dev).manual_seed(self.options.seed + 1))
            self.notes.append("random weights: every network is randomly initialised (timing only, output is noise)")
        else:
            m = load_mini(self.weights_dir, p, dev, dt)
            self.dit, self.portrait, self.expression, self.clip, self.vae = m.dit, m.portrait, m.expression, m.clip, \
                m.vae
            self.context = m.context
            table = Path(self.weights_dir) / QUALITY_LADDER_FILE
            if table.is_file():
                from engine.controller import load_quality_table

                self.quality = load_quality_table(table)
                self.notes.append(f"controller ladder ordered by measured quality ({QUALITY_LADDER_FILE})")
            if self.sampler_cfg.fast:
                self.notes.append("mini: no distillation LoRA exists for it; the 4-step schedule runs on the base DiT")

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
        """The pair step (batch 2 with guidance; compiled and captured on CUDA) and, with the guidance economy, the
        expression branch alone (batch 1), captured into the same CUDA graph memory pool: the two never run at once
        and no tensor of the pool outlives a replay (their outputs are static buffers outside it)."""
        from kernels.graphs import CompiledStep, StepShape
        from engine.distributed import make_step, world_size  # on rank 0 of several GPUs (--gpus N), ParallelStep

        h, w = self.latent_hw
        shape = StepShape(self.batch, self.window_cfg.context_size, h, w)
        if world_size() > 1:
            self.step = make_step(self.dit, shape, self.runtime)
        else:  # the step reads the engine's context K/V where they are: no second copy (1.3 GB at 14b, batch 2)
            dense = all(t.is_contiguous() and t.dtype == self.dtype for kv in self.kv for t in kv)
            self.step = CompiledStep(self.dit, shape, self.runtime, kv_buffers=self.kv if dense else None)
            self.kv = self.step.kv
        # The guidance pair runs as one batch: ip_scale per sample, 1 (emotion branch) and 0 (no-emotion branch).
        self.ip_scale_step = self.ip_scale
        self.step.set_session(None, None, self.y_batch, kv=self.kv)
        if self.step.use_graph:
            self.step.write_inputs(self.step.x, 1000.0, self.step.emo, self.ip_scale_step)
            self.step.capture()
        self.kv1 = [tuple(t[:1] for t in kv) for kv in self.kv]  # batch-1 views (the context is the same)
        self.ctx_img1, self.ctx_txt1 = self.ctx_img[:1], self.ctx_txt[:1]
        if self.batch == 2 and self.emo_refresh > 1 and isinstance(self.step, CompiledStep):
            # the pair's context K/V, first half: the same values, no second copy (0.6 GB at 14b)
            self.step1 = CompiledStep(self.dit, dataclasses.replace(shape, batch=1), self.runtime,
                                      pool=self.step.pool, kv_buffers=self.kv1)
            self.step1.set_session(None, None, self.y, kv=self.kv1)
            if self.step1.use_graph:
                self.step1.write_inputs(self.step1.x, 1000.0, self.step1.emo, 1.0)
                self.step1.capture()

    @property
    def live_steps(self) -> int:
        """Sampler steps of the full budget: the distilled schedule's 4 (or fewer when `steps` says so), else
        `steps` of the flow-matching schedule."""
        s = self.sampler_cfg
        return min(s.steps, len(DISTILLED_TIMESTEPS)) if s.fast else s.steps

    # --- per-session helpers ---------------------------------------------------------------------------------------
    def cached_dit(self, schedule, alpa: ALPAConfig) -> "_StepCachedDiT":
        return _StepCachedDiT(self.dit, schedule, alpa, step=self.step, ip_scale=self.ip_scale_step,
                              delay_s=self.options.step_delay_s, single=self.step1)

    def make_guidance(self, shadow: bool = False, refresh: int | None = None, reuse: str = "delta"):
        """A session's guidance economy state (engine/guidance.py), or None when the pair runs at every pass.
        `refresh` overrides the engine's (needs the batch-1 step: the engine was built with a refresh > 1)."""
        from engine.guidance import GuidanceEconomy

        if self.step1 is None:
            return None
        return GuidanceEconomy(self.sampler_cfg.emo_cfg, refresh or self.emo_refresh, reuse=reuse, shadow=shadow)

    def guided_flow(self, cached: CachedDiT, x: torch.Tensor, i: int, emo: torch.Tensor, key, frame=None,
                    guide=None) -> torch.Tensor:
        """Guided flow (1, 16, n, h, w) of step i.

        x (1, 16, n, h, w) latent, emo (1, n, 97, emo_dim) tokens. Without `guide`: both guidance branches as one
        batch of 2 through `cached`; the pair shares one ALPA cache key (the difference tables are elementwise, so
        each batch element (branch) keeps its own trajectory). With `guide` (engine.guidance.GuidanceEconomy, live
        windows; `frame` = global index of the window's first latent frame): the expression branch alone, the pair
        where the economy asks for it, the no-expression branch estimated in between.
        """
        if guide is not None and frame is not None and x.shape == self.step1.x.shape and self._economy_fits(cached):
            return self._economy_flow(cached, x, i, emo, key, frame, guide)
        n, B = x.shape[2], self.batch
        y = self.y_batch if n == self.y_batch.shape[2] else self.y_batch[:, :, :n]
        flows = cached(x.expand(B, -1, -1, -1, -1), i, self.ctx_img, self.ctx_txt, y,
                       emo.expand(B, -1, -1, -1), ip_scale=self.ip_scale if B > 1 else 1.0, key=key, kv=self.kv)
        if B == 1:
            return flows
        emo_flow, no_emo = flows[:1], flows[1:]
        return no_emo + self.sampler_cfg.emo_cfg * (emo_flow - no_emo)

    @staticmethod
    def _economy_fits(cached) -> bool:
        """The economy needs full passes through the compiled steps and the output-only ALPA cache (what the live
        path runs); TeaCache and layer caches keep the pair at every pass."""
        cfg = cached.cfg
        return cfg.mode == "off" or (cfg.mode in ("alpa", "taylorseer") and cfg.cache == "output")

    def _economy_flow(self, cached: "_StepCachedDiT", x, i: int, emo, key, frame: int, guide) -> torch.Tensor:
        sigma = cached.schedule.sigma_list[i]
        full = cached.will_run_full(i, key)
        cached.pair_request = guide.wants_pair(i, sigma, frame, full is not False)
        try:
            emo_flow = cached(x, i, self.ctx_img1, self.ctx_txt1, self.y, emo, ip_scale=1.0, key=key, kv=self.kv1)
        finally:
            cached.pair_request = False
        no_emo, cached.pair_no_emo = cached.pair_no_emo, None
        flow = guide.combine(emo_flow, sigma, frame, no_emo, full=full is not False)
        if guide.shadow and no_emo is None and full:
            # bench / test: the true pair on the same input at a single pass (its expression flow is exact, so the
            # difference is the no-expression estimate's alone; predicted steps add ALPA's own error on top)
            t = cached.schedule.timesteps[i:i + 1].to(x.device).expand(2)
            pair = self.step(x.expand(2, *x.shape[1:]), t, emo.expand(2, *emo.shape[1:]), self.ip_scale_step)
            guide.observe_error(flow, pair[:1], pair[1:])
        return flow

    def guidance_error(self, refresh: int | None = None, windows: int = 6, interval: int = 1, reuse: str = "delta",
                       seed: int = 0, token_corr: float = 0.9) -> dict:
        """The guidance economy against the pair at every pass on this engine (engine.guidance.measure_economy)."""
        from engine.guidance import measure_economy

        return measure_economy(self, refresh, windows, interval, reuse, seed, token_corr)

    def make_decoder(self):
        from engine.models.tiny_vae import StreamingTinyDecoder
        from engine.models.vae import StreamingDecoder

        if self.preset.autoencoder is not None:
            from engine.models.mini_vae import StreamingMiniDecoder

            return StreamingMiniDecoder(self.vae)
        if self.options.decoder == "tiny" and self.tiny_vae is not None:
            return StreamingTinyDecoder(self.tiny_vae)
        return StreamingDecoder(self.vae)

    def make_extractor(self):
        from engine.models.pdfgc.extractor import ExpressionExtractor, make_landmarks

        if self.preset.autoencoder is not None:  # mini: face-mesh landmarks -> its expression encoder
            from engine.mini import FaceMeshTracker, MiniExpressionExtractor

            neutral = FaceMeshTracker(static=True)(self.reference)
            return MiniExpressionExtractor(self.expression, FaceMeshTracker(), neutral_landmarks=neutral)
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
        cuda = self.device.type == "cuda"
        return {"preset": self.preset.name, "random_weights": self.random_weights, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "batch": self.batch,
                "fp8": bool(self.runtime.fp8), "low_vram": bool(self.runtime.low_vram),
                "fp8_scaling": self.runtime.fp8_scaling if self.runtime.fp8 else None,
                "emo_cfg": self.sampler_cfg.emo_cfg, "emo_refresh": self.emo_refresh, "guidance_economy": self.economy,
                "released_after_conditioning": self.released,
                "peak_warm_up_gib": round(self.peak_load_bytes / 2**30, 2) if self.peak_load_bytes else None,
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if cuda else None,
                "warm_up_single_pass_ms": round(1e3 * self.timings["single_pass_s"], 2)
                if "single_pass_s" in self.timings else None,
                "compiled": bool(getattr(getattr(self, "step", None), "compiled", False)),
                "cuda_graph": bool(getattr(getattr(self, "step", None), "use_graph", False)),
                "warm_up_s": None if self.warm_up_s is None else round(self.warm_up_s, 2),
                "warm_up_pass_ms": round(1e3 * self.timings["pass_s"], 2) if self.timings else None,
                "warm_up_decode_latent_ms": round(1e3 * self.timings["decode_latent_s"], 2) if self.timings else None,
                "decoder": self._decoder_name(), "sessions": self.sessions, "notes": self.notes}

    def _decoder_name(self) -> str:
        if self.preset.autoencoder is not None:
            return "mini"
        return "tiny" if self.options.decoder == "tiny" and getattr(self, "tiny_vae", None) is not None else "wan"


def frames_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, f, H, W) in [-1, 1] -> (f, H, W, 3) uint8 on the host (one copy)."""
    return video[0].permute(1, 2, 3, 0).add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
