"""Configuration as data: one dataclass per concern, presets as instances.

Model presets (`tiny`, `mini`, `1.3b`, `14b`) bundle the shapes of every network the FlashPortrait renderer runs; the
runtime, sampler, window, ALPA and streaming dataclasses are built from CLI flags. Nothing here reads the
environment.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1 I2V DiT + FlashPortrait NFEB. Defaults are Wan2.1-I2V-14B-720P."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36  # [noise 16 | mask 4 | reference latent 16]
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    clip_dim: int = 1280
    clip_tokens: int = 257  # image tokens come first in the context: [clip_tokens | text_len]
    emo_dim: int = 2048  # PortraitEncoder token width, input of emo_k_proj / emo_v_proj
    emo_tokens_per_frame: int = 97
    rope_theta: float = 10000.0
    rope_max_len: int = 1024

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def rope_split(self) -> tuple[int, int, int]:
        """Complex columns per axis (frame, row, column) of one head: (22, 21, 21) for head_dim 128."""
        d = self.head_dim
        return (d - 4 * (d // 6)) // 2, (2 * (d // 6)) // 2, (2 * (d // 6)) // 2

    def num_params(self) -> int:
        """Parameter count (weights + biases) of the DiT, for FLOP and memory arithmetic."""
        D, F = self.dim, self.ffn_dim
        pt, ph, pw = self.patch_size
        block = 4 * (D * D + D) + 6 * (D * D + D) + 2 * self.emo_dim * D + 5 * D + 2 * D + 6 * D
        block += D * F + F + F * D + D
        top = self.in_dim * pt * ph * pw * D + D
        top += self.text_dim * D + D + D * D + D + self.freq_dim * D + D + D * D + D + D * 6 * D + 6 * D
        top += 2 * self.clip_dim + self.clip_dim * self.clip_dim + self.clip_dim + self.clip_dim * D + D + 2 * D
        top += 2 * D + D * self.out_dim * pt * ph * pw + self.out_dim * pt * ph * pw
        return self.num_layers * block + top


@dataclass(frozen=True)
class PortraitEncoderConfig:
    """PD-FGC 554-d vector per frame -> 24 tokens of `out_dim` (FlashPortrait `portrait_encoder.pt`)."""

    out_dim: int = 2048
    resampler_dim: int = 1280
    depth: int = 4
    heads: int = 20
    dim_head: int = 64
    ff_mult: int = 4
    mouth_queries: int = 16
    emo_queries: int = 4
    headpose_dim: int = 6
    eye_dim: int = 6
    emo_dim: int = 30
    mouth_dim: int = 512

    @property
    def feature_dim(self) -> int:
        return self.headpose_dim + self.eye_dim + self.emo_dim + self.mouth_dim

    @property
    def tokens_per_frame(self) -> int:
        return 4 + self.mouth_queries + self.emo_queries


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3D VAE (`Wan2.1_VAE.pth`)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    temporal_stride: int = 4
    spatial_stride: int = 8


@dataclass(frozen=True)
class ClipVisionConfig:
    """open-clip XLM-RoBERTa-large ViT-H/14 vision tower as Wan uses it (penultimate block output)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: float = 4.0
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class T5Config:
    """umT5-XXL encoder (`models_t5_umt5-xxl-enc-bf16.pth`)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    text_len: int = 512


@dataclass(frozen=True)
class TinyVAEConfig:
    """TAEHV (taew2_1 layout) decoder/encoder widths; (256, 128, 64) is the published model."""

    latent_channels: int = 16
    channels: tuple[int, int, int] = (256, 128, 64)
    encoder_channels: int = 64


@dataclass(frozen=True)
class MiniVAEConfig:
    """The mini preset's video autoencoder (engine/models/mini_vae.py): Wan's 1+4k -> 1+k frames, 16 ch, 8x."""

    channels: tuple[int, int, int] = (24, 64, 128)  # widths at 1/2, 1/4, 1/8 resolution
    z_dim: int = 16
    temporal_stride: int = 4
    spatial_stride: int = 8
    # True: frame 0 is encoded as a group of four copies of itself (group_in / group_out), so a stream's first latent
    # and the later ones share one latent space. False: the first checkpoints' separate first_in / first_out maps
    # (load_mini_vae tells them apart by their keys).
    first_as_group: bool = True


@dataclass(frozen=True)
class LandmarkExpressionConfig:
    """The mini preset's expression encoder (engine/models/mini_expression.py): face-mesh landmarks -> the
    PD-FGC-shaped vector, standing in for the FanEncoder whose weights do not exist here."""

    hidden: int = 256


@dataclass(frozen=True)
class ModelPreset:
    """Every network shape one renderer needs. `autoencoder` / `landmark_expression` are set for `mini` only: it
    decodes with its own small autoencoder and reads expression from face-mesh landmarks (see engine/models/)."""

    name: str
    dit: DiTConfig
    portrait: PortraitEncoderConfig = field(default_factory=PortraitEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    t5: T5Config = field(default_factory=T5Config)
    tiny_vae: TinyVAEConfig = field(default_factory=TinyVAEConfig)
    autoencoder: MiniVAEConfig | None = None
    landmark_expression: LandmarkExpressionConfig | None = None


_TINY = ModelPreset(
    name="tiny",
    dit=DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32,
                  clip_dim=32, clip_tokens=5, emo_dim=32),
    portrait=PortraitEncoderConfig(out_dim=32, resampler_dim=32, depth=2, heads=2, dim_head=16, ff_mult=2),
    vae=VAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    clip=ClipVisionConfig(image_size=28, patch_size=14, width=32, layers=3, heads=2),
    t5=T5Config(vocab_size=128, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, text_len=16),
    tiny_vae=TinyVAEConfig(channels=(32, 16, 8), encoder_channels=8),
)

# Trained here (train/train_mini.py) on the driving videos at 128x128: the project's own DiT + NFEB + PortraitEncoder
# at a small width, a small autoencoder with Wan's frame accounting, a landmark expression encoder. The text context
# is one learned tensor (the prompt is fixed), the CLIP tower a small ViT trained jointly.
_MINI = ModelPreset(
    name="mini",
    dit=DiTConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=32, text_len=8, freq_dim=64,
                  clip_dim=64, clip_tokens=17, emo_dim=64),
    portrait=PortraitEncoderConfig(out_dim=64, resampler_dim=64, depth=1, heads=2, dim_head=32, ff_mult=2,
                                   mouth_dim=64),
    clip=ClipVisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=2),
    autoencoder=MiniVAEConfig(),
    landmark_expression=LandmarkExpressionConfig(),
)

_1_3B = ModelPreset(
    name="1.3b",
    # Wan2.1-Fun-1.3B-InP shapes; FlashPortrait's NFEB (emo_k/v_proj) and CLIP image branch added on top.
    dit=DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
)

_14B = ModelPreset(name="14b", dit=DiTConfig())

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (_TINY, _MINI, _1_3B, _14B)}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.") from None


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"Unknown dtype {name!r}: use fp32, bf16 or fp16.") from None


@dataclass
class RuntimeConfig:
    """Where and how the model runs."""

    device: str = "cuda"
    dtype: str = "bf16"
    compile: bool = True  # torch.compile the fixed-shape DiT step
    cuda_graphs: bool = True  # capture the compiled step into a CUDA graph
    attention: str = "auto"  # auto | sdpa | flash | cudnn | fa3 | math
    fp8: bool = False  # e4m3 weights for the DiT block linears, inside the compiled step (large presets)
    fp8_scaling: str = "rowwise"  # rowwise (per token / per output row) | tensorwise (one scale each: faster GEMMs)
    fused_kernels: bool = True  # Triton RMSNorm+RoPE and LayerNorm+modulation on CUDA
    # The 24 GB mode (--low-vram): the DiT is built or loaded block by block straight into FP8 (the bf16 model never
    # sits on the device whole), and CLIP / umT5 / the Wan VAE encoder are freed once the conditioning exists.
    low_vram: bool = False
    # Live guidance economy (engine/guidance.py): the no-expression branch is computed at one expression full pass
    # in `emo_refresh` (the pair as one batch of 2) and estimated from the last guidance difference at the others
    # (the expression branch alone, batch 1). 1 = the pair at every pass; None = auto (engine.guidance.auto_refresh).
    emo_refresh: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


@dataclass
class SamplerConfig:
    """Flow-matching Euler sampler and expression guidance."""

    steps: int = 30
    shift: float = 5.0
    fast: bool = False  # 4-step distilled schedule (timesteps 1000, 750, 500, 250) with the LoRA merged
    emo_cfg: float = 4.0  # noise = no_emo + emo_cfg * (emo - no_emo); 1.0 turns the second pass off
    text_cfg: float = 1.0
    seed: int = 0


@dataclass
class WindowConfig:
    """WSWS windows in latent frames."""

    context_size: int = 51
    context_overlap: int = 30

    @property
    def stride(self) -> int:
        return self.context_size - self.context_overlap


@dataclass
class ALPAConfig:
    """Adaptive Latent Prediction: full DiT every `interval` steps, Taylor order `order` in between."""

    mode: str = "alpa"  # off | alpa | taylorseer | teacache
    interval: int = 5  # K
    order: int = 3  # n
    alpha: float = 1.5  # latent change-rate exponent
    cache: str = "layers"  # layers (every block's output) | output (final DiT output only: lighter)
    teacache_threshold: float = 0.1


@dataclass
class StreamConfig:
    """The live service: network, pacing and sinks."""

    host: str = "127.0.0.1"
    port: int = 8080
    fps: float = 25.0
    width: int = 512
    height: int = 512
    playout_frames: int = 3  # small playout buffer in front of every sink
    input_queue: int = 4  # capture drops the oldest frame beyond this
    driving: str | None = None  # video file (looped) or /dev/videoN instead of the browser camera
    vcam: bool = False
    record: str | None = None
    # who may use the server (streaming/guard.py): extra Host names ("name" or "name:port") and page origins
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    ice_servers: tuple[str, ...] = ()  # STUN/TURN URLs; none: no third-party traffic (streaming/ice.py)
    handshake_timeout_s: float = 8.0  # an answered offer whose peer never connects is freed after this
    peer_timeout_s: float = 5.0  # a connected peer silent this long (no RTP/RTCP/DTLS packet) is freed
    max_body_bytes: int = 256 * 1024  # POST /offer body limit (an offer SDP is a few KB)


def replace(cfg, **changes):
    """dataclasses.replace that ignores None values (unset CLI flags)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
