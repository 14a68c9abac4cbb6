"""The fixed-shape DiT step: torch.compile + one CUDA graph for the whole step, replayed for every step and window.

    step = CompiledStep(model, StepShape(batch=1, frames=6, height=64, width=64), RuntimeConfig())
    step.set_session(context, clip_fea, y)       # once per session: context K/V of every block, y, RoPE tables
    flow = step(x, t, emo, ip_scale)             # every step: (B, 16, F, H, W) fp32, equal to model(x, t, context,
                                                 #   clip_fea, y, emo, ip_scale); a static buffer, overwritten by
                                                 #   the next call (copy it if you keep it)

What goes in the graph: patchify, the time embedding, every block (WanAttentionBlock with `kv=`, the DiT's
precomputed-context path), the head and unpatchify, reading static input buffers (`x` latent, `t` timesteps, `emo`
expression tokens, `ip_scale` (B,) per sample) and session buffers (`kv` per block, `y`, RoPE `cos`/`sin`) and
writing the static output `out`. A call copies the inputs in and replays the graph: no allocation, no host sync
(pass device tensors; Python floats for t / ip_scale are written with fill_).

emo=None runs the same graph with ip_scale 0, which equals the model without the expression branch (the NFEB adds
ip_scale * normalised emotion attention, so 0 adds exactly zero). The guidance pair runs as one batch of 2 with
ip_scale = tensor([1, 0]): each sample gets what its own pass would (the NFEB statistics are per sample).

Compilation is regional by default (`scope="block"`): one compiled block function serves all blocks (same code,
same shapes), so compile time does not grow with depth; the whole-step CUDA graph already removes the launch gaps
between the eager glue ops. `scope="step"` compiles the whole step as one graph instead (slower to build).

Inductor runs with `INDUCTOR_OPTIONS` (coordinate-descent tuning of its Triton kernels: the step is compiled once
per shape and replayed for a whole session, so a longer compile buys every step back); `compile_mode` (e.g.
"max-autotune-no-cudagraphs") or `inductor_options` replace them.

On CPU (or with runtime.compile / runtime.cuda_graphs off) the same step runs eagerly with the same buffers.
`record_layers=True` also keeps every block's output in `layers` (num_layers, B, L, D) for layer-wise ALPA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import attention as attention_backend
from kernels import fused


# Inductor config for the step's compile. Coordinate descent re-tunes the block sizes / warps of every generated
# reduction and pointwise kernel by timing neighbours of the default config: the step's norms reduce over D = 1536
# (1.3b), above Inductor's 1024-wide persistent-reduction cut-off, where the single default loop config is slow.
INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}


@dataclass(frozen=True)
class StepShape:
    """Fixed input shape of one DiT call: latent (batch, 16, frames, height, width)."""

    batch: int = 1
    frames: int = 6
    height: int = 64
    width: int = 64

    @classmethod
    def from_video(cls, width_px: int, height_px: int, latent_frames: int, batch: int = 1, stride: int = 8):
        """Latent shape of a width x height video (the Wan VAE downsamples space by 8)."""
        return cls(batch, latent_frames, height_px // stride, width_px // stride)

    def grid(self, patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
        pt, ph, pw = patch_size
        return self.frames // pt, self.height // ph, self.width // pw

    def tokens(self, patch_size: tuple[int, int, int]) -> int:
        f, h, w = self.grid(patch_size)
        return f * h * w


# --- the step, from the model's pieces with per-session context K/V ---------------------------------------------
def block_forward(block: nn.Module, x, e0, cos, sin, kv, emo, ip_scale):
    """One WanAttentionBlock with its precomputed context K/V and a per-sample ip_scale (B,): (B, L, D) -> (B, L, D).

    The function torch.compile sees in the regional scope: every block calls it with the same shapes."""
    return block(x, e0, cos, sin, None, None, emo, ip_scale, kv=kv)


def step_forward(model: nn.Module, x, y, t, cos, sin, kvs, emo, ip_scale, block_fn=block_forward, layers=None):
    """The whole step from its inputs: x (B, 16, F, H, W), y (B, 20, F, H, W), t (B,), RoPE cos/sin (L, hd/2), kvs
    (one (k_img, v_img, k_txt, v_txt) per block), emo (B, F, 97, emo_dim), ip_scale (B,) -> (B, 16, F, H, W) fp32."""
    tokens, grid = model.patchify(x, y)
    e, e0 = model.embed_time(t)
    for i, (block, kv) in enumerate(zip(model.blocks, kvs)):
        tokens = block_fn(block, tokens, e0, cos, sin, kv, emo, ip_scale)
        if layers is not None:
            layers[i].copy_(tokens)
    return model.unpatchify(model.head(tokens, e).float(), grid)


class CompiledStep:
    """One DiT forward at a fixed shape, compiled and graph-captured on CUDA, eager elsewhere.

    model: WanModel, used in place: with runtime.fused_kernels each block's FFN becomes a GeluFFN (same weights and
    keys, one GEMM + GELU epilogue on CUDA) and with runtime.fp8 the block linears become FP8 ones.
    shape: StepShape. runtime: engine.config.RuntimeConfig, or any object with its fields compile, cuda_graphs,
    attention, fp8, fused_kernels (and optionally fp8_scaling: "rowwise" | "tensorwise"; kernels never import the
    engine).
    compile_backend: None = inductor on CUDA and no compile on CPU; a name ("inductor", "aot_eager", ...) forces
    torch.compile with that backend on any device. compile_mode: a torch.compile mode (then inductor_options are not
    used). inductor_options: Inductor config for this compile (default INDUCTOR_OPTIONS; {} = Inductor's defaults).
    pool: a CUDA graph memory pool to share with other steps (`other.pool`), so several shapes can live in one arena.
    kv_buffers: per-block (k_img, v_img, k_txt, v_txt) tensors of this step's batch to use as its context K/V
    buffers instead of allocating them (e.g. a batch-1 step reading `[t[:1] for t in pair.kv[i]]`, the same context
    as a guidance pair's: 0.6 GB less at 14b); set_session then writes into them.
    """

    def __init__(self, model: nn.Module, shape: StepShape, runtime, *,
                 scope: str = "block", compile_backend: str | None = None, compile_mode: str | None = None,
                 inductor_options: dict | None = None, record_layers: bool = False, pool=None, kv_buffers=None):
        if scope not in ("block", "step"):
            raise ValueError(f"Unknown compile scope {scope!r}: use 'block' or 'step'.")
        self.model = model.eval()
        self.shape = shape
        self.runtime = runtime
        cfg = model.cfg
        param = model.patch_embedding.weight
        self.device, self.dtype = param.device, param.dtype
        self.is_cuda = self.device.type == "cuda"

        attention_backend.configure(runtime)
        fused.set_fused_kernels(runtime.fused_kernels)
        if runtime.fused_kernels:
            fused.fuse_ffn_gelu(model)  # same weights and keys; differs from the Sequential only on CUDA
        if runtime.fp8:
            from kernels.fp8 import quantize_linears

            quantize_linears(model, rowwise=getattr(runtime, "fp8_scaling", "rowwise") != "tensorwise")

        B, F, H, W = shape.batch, shape.frames, shape.height, shape.width
        L, D = shape.tokens(cfg.patch_size), cfg.dim
        heads, hd = cfg.num_heads, cfg.head_dim
        dev = self.device
        with torch.no_grad():
            # Static inputs: the sampler's fp32 latent and timesteps, expression tokens in the model dtype.
            self.x = torch.zeros(B, cfg.out_dim, F, H, W, device=dev)
            self.t = torch.zeros(B, device=dev)
            self.emo = torch.zeros(B, F, cfg.emo_tokens_per_frame, cfg.emo_dim, device=dev, dtype=self.dtype)
            self.ip_scale = torch.zeros(B, device=dev)  # per sample: a guidance pair (1, 0) runs as one batch
            # Session buffers: written by set_session, read by every call.
            self.y = torch.zeros(B, cfg.in_dim - cfg.out_dim, F, H, W, device=dev)
            sizes = (cfg.clip_tokens, cfg.clip_tokens, cfg.text_len, cfg.text_len)
            if kv_buffers is not None:
                self.kv = [tuple(kv) for kv in kv_buffers]
                if len(self.kv) != len(model.blocks) or any(
                        tuple(t.shape) != (B, n, heads, hd) or not t.is_contiguous() or t.dtype != self.dtype
                        for kv in self.kv for t, n in zip(kv, sizes)):
                    raise ValueError("kv_buffers must hold one contiguous (batch, n, heads, head_dim) tensor per "
                                     "context K/V of every block, in the model dtype.")
            else:
                self.kv = [tuple(torch.zeros(B, n, heads, hd, device=dev, dtype=self.dtype) for n in sizes)
                           for _ in model.blocks]
            self.grid = shape.grid(cfg.patch_size)
            cos, sin = model.rope(self.grid, dev)
            self.cos, self.sin = cos.clone(), sin.clone()
            self.out = torch.zeros(B, cfg.out_dim, F, H, W, device=dev)
            self.layers = torch.zeros(len(model.blocks), B, L, D, device=dev, dtype=self.dtype) if record_layers \
                else None

        wants_compile = compile_backend is not None or (runtime.compile and self.is_cuda)
        backend = compile_backend or "inductor"
        self.compiled = wants_compile
        self._block = block_forward
        self._step = self._forward
        self.compile_options: dict = {}
        if wants_compile:
            # FA3 builds without torch.library registration break the graph; everything else must trace whole.
            fullgraph = attention_backend.get_backend() not in ("auto", "fa3") or not attention_backend.fa3_available()
            opts = dict(fullgraph=fullgraph, dynamic=False, backend=backend)
            if compile_mode is not None:
                opts["mode"] = compile_mode  # torch.compile takes a mode or options, not both
            elif backend == "inductor":
                options = INDUCTOR_OPTIONS if inductor_options is None else inductor_options
                if options:
                    opts["options"] = dict(options)
            self.compile_options = opts
            if scope == "block":
                self._block = torch.compile(block_forward, **opts)
            else:
                self._step = torch.compile(self._forward, **opts)
        self.use_graph = self.is_cuda and runtime.cuda_graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self._pool = pool
        self.session_set = False

    # --- session -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_session(self, context: torch.Tensor | None, clip_fea: torch.Tensor | None, y: torch.Tensor,
                    frame_offset: int = 0, kv: list | None = None):
        """Per-session constants: umT5 context (B, n, text_dim), CLIP tokens (B, clip_tokens, clip_dim), y (B, 20,
        F, H, W). Computes every block's image/text K/V once (or takes `kv`, the model's `context_kv(...)` already
        computed, with context / clip_fea None) and writes them into the graph's buffers; no recapture needed."""
        model = self.model
        if kv is None:
            kv = model.context_kv(*model.embed_context(context, clip_fea))
        for buffers, values in zip(self.kv, kv):
            for buf, value in zip(buffers, values):
                buf.copy_(value)
        self.y.copy_(y)
        cos, sin = model.rope(self.grid, self.device, frame_offset=frame_offset)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.session_set = True

    # --- the step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self) -> None:
        """Reads the static buffers, writes self.out (and self.layers)."""
        out = step_forward(self.model, self.x, self.y, self.t, self.cos, self.sin, self.kv, self.emo, self.ip_scale,
                           block_fn=self._block, layers=self.layers)
        self.out.copy_(out)

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Compile (first warm-up run) and capture the step into a CUDA graph; a no-op off CUDA."""
        if not self.use_graph or self.graph is not None:
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self._pool):
            self._step()
        self._pool = self.graph.pool()

    @property
    def pool(self):
        """The CUDA graph memory pool (after capture), to share with another CompiledStep."""
        return self._pool

    @torch.no_grad()
    def write_inputs(self, x: torch.Tensor, t, emo: torch.Tensor | None = None, ip_scale: float = 1.0) -> None:
        """Copy one call's inputs into the static buffers (device tensors or Python floats: no host sync)."""
        self.x.copy_(x)
        if isinstance(t, torch.Tensor):
            self.t.copy_(t.reshape(-1).expand(self.t.shape[0]))
        else:
            self.t.fill_(float(t))
        if emo is None:
            self.ip_scale.fill_(0.0)
        else:
            self.emo.copy_(emo)
            if isinstance(ip_scale, torch.Tensor):
                self.ip_scale.copy_(ip_scale.reshape(-1).expand(self.ip_scale.numel()).view_as(self.ip_scale))
            else:
                self.ip_scale.fill_(float(ip_scale))

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        """Run the step on the current buffers (replay when captured); returns the static output."""
        if not self.session_set:
            raise RuntimeError("CompiledStep.set_session(context, clip_fea, y) must run before the first step.")
        if self.use_graph:
            if self.graph is None:
                self.capture()
            self.graph.replay()
        else:
            self._step()
        return self.out

    def __call__(self, x: torch.Tensor, t, emo: torch.Tensor | None = None, ip_scale=1.0) -> torch.Tensor:
        """x (B, 16, F, H, W), t (B,) or float, emo (B, F, 97, emo_dim) or None, ip_scale float or (B,) tensor
        -> flow (B, 16, F, H, W) fp32."""
        self.write_inputs(x, t, emo, ip_scale)
        return self.run()
