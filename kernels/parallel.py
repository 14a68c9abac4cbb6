"""Sequence-parallel DiT over torch.distributed: one window's tokens split across the ranks of a group.

The same `WanModel` weights run on every rank (each rank holds a full copy); what is split is the token sequence.
Rank s of a sequence group of P ranks owns the padded global tokens [s*Lp, (s+1)*Lp), Lp = ceil(L / P); padding
tokens sit at the end of the window, are excluded from every statistic and are dropped from the output.

    self-attention    q/k/v of the local tokens (RMSNorm per token, RoPE with the GLOBAL positions of the local
                      tokens) -> all-to-all tokens->heads (every rank: the whole window, H/P heads) -> attention
                      over the real tokens -> all-to-all heads->tokens (Ulysses). Heads that P does not divide are
                      padded with zero heads, which attend to zeros and are dropped.
    cross-attention   per token: the context K/V (CLIP image + text) are replicated, queries are local.
    NFEB              each local token attends to ITS latent frame's 97 expression tokens (frame = global index //
                      (L // F), the grouping of `engine.nfeb.expression_attention`); the mean / unbiased std over
                      (tokens, channels) of the sample come from one all-reduce of per-rank moments.
    head              per token, so it runs on the local tokens; only its small output (out_dim * 4 channels) is
                      all-gathered, then unpatchified on every rank.

CFG: a world of G * P ranks is G CFG groups of P sequence ranks (rank = g * P + s). Group g computes guidance
branches g, g + G, ...; the outputs are exchanged with one all_gather among the ranks of equal s, so every rank
ends with every branch (`SequenceParallelDiT.forward_branches`).

Launch (NCCL on GPU, gloo on CPU; NCCL's NVLink multicast is kept off: NCCL_NVLS_ENABLE=0). flashlive.py does:

    torchrun --nproc_per_node N -m flashlive serve ...  ->  info = init_distributed()   # on every rank
    flashlive serve --gpus N                           ->  info, children = start_followers(follower, N)   # rank 0
    rank 0: the command as usual; engine/renderer.py's _build_step calls make_step(model, shape, runtime), which
            is a ParallelStep here (the CompiledStep interface over a Driver); at exit shutdown() releases the rest
    others: follower(info)  # waits for rank 0's ParallelStep, receives the DiT's config and weights from it (one
                            # broadcast per tensor: rank 0's weights exactly, checkpoint, merged LoRA or random init
                            # alike), then runs every DiT call rank 0 makes until shutdown()

Used directly (benches, tests), with a model built on every rank and spawn(worker, N, ...) or torchrun:

    def worker(info, args):                 # module level (spawn pickles it by name)
        model = <WanModel on info.device, weights loaded>            # every rank holds the full weights
        dit = SequenceParallelDiT(model, make_groups(cfg_size=args.cfg_parallel))   # 1, or 2 for emotion CFG
        if info.rank == 0:                  # owns the WebRTC side: server, capture, expression, VAE, sinks
            driver = Driver(dit)
            driver.set_session(context, clip_fea)        # per session: context K/V on every rank
            ... driver.branches([{"ip_scale": 1.0}, {"ip_scale": 0.0}], x=x, t=t, context=None, clip_fea=None,
                y=y, emo=emo) (or driver(x, t, None, None, y, emo, ip_scale)) where it would call the DiT ...
            driver.close()                  # at shutdown: releases the followers
        else:
            follow(dit)                     # runs every call rank 0 makes, until driver.close()

Only rank 0 touches the network, the camera and the encoder; the other ranks only ever run DiT calls. Self-attention
heads must split over the sequence ranks to avoid padding work: 14b (40 heads) takes 2, 4, 5 or 8 sequence ranks
at full efficiency, 1.3b (12 heads) 2, 3, 4 or 6.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from engine.config import RuntimeConfig
from engine.dit import WanI2VCrossAttention, WanModel, WanSelfAttention
from engine.nfeb import NORM_EPS, expression_attention
from kernels import attention as attention_backend
from kernels import fused
from kernels.attention import attention
from kernels.graphs import CompiledStep, StepShape

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (same arguments); older GPU hosts have only the former.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# --- process setup ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """This process's place in the world."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout: timedelta | None = None) -> DistInfo:
    """Join the process group that torchrun (or `spawn`) describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*.

    This is the entry point's boundary, so it reads the launcher's environment. Without a launcher it forms a
    world of one. device: "cuda" (one GPU per local rank, NCCL) or "cpu" (gloo); default cuda when available.
    timeout: how long a collective may wait for its peers (None: torch's default; a server's followers wait for the
    next DiT call as long as no peer is connected, so `flashlive serve` passes days).
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"Local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                               f"start at most {torch.cuda.device_count()} processes per host.")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast must stay off on the lent machines
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError(f"WORLD_SIZE is {world} but MASTER_PORT is unset: launch with torchrun or spawn().")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank, world, local_rank, dev)


def _spawned(index: int, fn: Callable, world_size: int, port: int, device: str | None, backend: str | None,
             args: tuple, first_rank: int = 0, timeout: timedelta | None = None) -> None:
    rank = first_rank + index
    if first_rank and sys.platform == "linux":
        # Followers of a parent that is rank 0 end with it, even when it is killed without a chance to close them.
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":  # spawned processes share one host: keep gloo's traffic on the loopback interface
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    info = init_distributed(device, backend, timeout)
    try:
        fn(info, *args)
    except BaseException:
        # mp.spawn re-raises only the first process to die, often a peer that lost its connection: name each.
        print(f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args, device: str | None = None, backend: str | None = None,
          start_method: str = "spawn") -> None:
    """Run fn(info: DistInfo, *args) in `world_size` processes joined into one group; returns when all end.

    fn must be importable (module level). An exception in any process is raised here. start_method "spawn"
    (fresh interpreters) is the one CUDA allows; "fork" starts in milliseconds and suits CPU-only callers that have
    not touched CUDA (tests).
    """
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by the children before NCCL starts
    mp.start_processes(_spawned, args=(fn, world_size, free_port(), device, backend, args), nprocs=world_size,
                       join=True, start_method=start_method)


def start_followers(fn: Callable, world_size: int, *args, device: str | None = None, backend: str | None = None,
                    timeout: timedelta | None = None, start_method: str = "spawn"):
    """Make THIS process rank 0 of a world of `world_size` and start ranks 1.. as child processes running
    fn(info, *args) (fn importable, as for `spawn`). Returns (this process's DistInfo, the children's
    torch.multiprocessing ProcessContext: join() them once rank 0 has released them, see `shutdown`).
    The children end when this process dies (Linux: parent-death signal)."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by the children before NCCL starts
    port = free_port()
    children = mp.start_processes(_spawned, args=(fn, world_size, port, device, backend, args, 1, timeout),
                                  nprocs=world_size - 1, join=False, start_method=start_method)
    os.environ.update(RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return init_distributed(device, backend, timeout), children


@dataclass(frozen=True)
class ParallelGroups:
    """cfg_size CFG groups x seq_size sequence ranks over `ranks`: rank = ranks[cfg_rank * seq_size + seq_rank].
    A group of one rank is None (nothing to communicate)."""

    seq_group: dist.ProcessGroup | None
    seq_rank: int
    seq_size: int
    cfg_group: dist.ProcessGroup | None
    cfg_rank: int
    cfg_size: int


def make_groups(cfg_size: int = 1, ranks: Sequence[int] | None = None) -> ParallelGroups | None:
    """Split `ranks` (default: the world) into CFG and sequence groups. Every rank of the WORLD must call this,
    in the same order (torch.distributed creates groups collectively); ranks outside `ranks` get None."""
    ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
    if len(ranks) % cfg_size:
        raise ValueError(f"{len(ranks)} ranks do not split into {cfg_size} CFG groups: use a divisor of {len(ranks)}.")
    seq_size = len(ranks) // cfg_size
    # Only groups of two or more ranks become communicators (each NCCL communicator holds GPU buffers).
    seq_groups = [dist.new_group(ranks[g * seq_size:(g + 1) * seq_size]) if seq_size > 1 else None
                  for g in range(cfg_size)]
    cfg_groups = [dist.new_group(ranks[s::seq_size]) if cfg_size > 1 else None for s in range(seq_size)]
    me = dist.get_rank()
    if me not in ranks:
        return None
    g, s = divmod(ranks.index(me), seq_size)
    return ParallelGroups(seq_groups[g], s, seq_size, cfg_groups[s], g, cfg_size)


# --- token split ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSplit:
    """Rank `rank` of `world` owns padded global tokens [start, start + local) of a window of `length` real tokens."""

    length: int
    world: int
    rank: int

    @property
    def local(self) -> int:
        return -(-self.length // self.world)

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def valid(self) -> int:
        """Real (non-padding) tokens among the local ones; they come first."""
        return max(0, min(self.local, self.length - self.start))

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a global (..., length, ...) tensor along `dim`, zero-padded to `local`."""
        x = x.narrow(dim, min(self.start, self.length), self.valid)
        if self.valid < self.local:
            pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, self.local - self.valid]
            x = F.pad(x, pad)
        return x


class _SplitState:
    """The split of the window being run. The block signature is fixed (it is WanModel's), so the attention
    modules read the split from here; SequenceParallelDiT sets it before it runs the blocks."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.split: TokenSplit | None = None


# --- collectives --------------------------------------------------------------------------------------------------
def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: TokenSplit,
                      group: dist.ProcessGroup) -> torch.Tensor:
    """Self-attention of the whole window for this rank's tokens: q, k, v (B, Lp, H, hd) -> (B, Lp, H, hd).

    One all-to-all sends head chunk j of the local tokens to rank j (so each rank holds every token of H/P heads),
    attention runs over the real tokens, and a second all-to-all brings each rank its tokens back with all heads.
    """
    P = split.world
    if P == 1:
        return attention(q, k, v)
    B, Lp, H, hd = q.shape
    Hl = -(-H // P)  # heads per rank; zero heads pad H up to P * Hl
    qkv = torch.stack((q, k, v))  # (3, B, Lp, H, hd)
    if Hl * P != H:
        qkv = F.pad(qkv, (0, 0, 0, Hl * P - H))
    send = qkv.unflatten(3, (P, Hl)).permute(3, 0, 1, 2, 4, 5).contiguous()  # (P, 3, B, Lp, Hl, hd)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] holds rank j's tokens: in rank order they are the padded window, real tokens first.
    full = recv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :split.length]  # (3, B, L, Hl, hd)
    out = attention(full[0], full[1], full[2])  # (B, L, Hl, hd)
    out = F.pad(out, (0, 0, 0, 0, 0, P * Lp - split.length))
    send = out.unflatten(1, (P, Lp)).transpose(0, 1).contiguous()  # (P, B, Lp, Hl, hd): token chunk j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).flatten(2, 3)[:, :, :H]  # (B, Lp, H, hd), head chunk j from rank j


def split_expression_attention(q: torch.Tensor, emo: torch.Tensor, emo_k_proj: nn.Linear, emo_v_proj: nn.Linear,
                               split: TokenSplit) -> torch.Tensor:
    """`engine.nfeb.expression_attention` for this rank's tokens: q (B, Lp, H, hd) -> (B, Lp, H*hd).

    Token i of the window belongs to latent frame i // (L // F); tokens past floor(L/F)*F, and padding, get zeros.
    The local tokens cover frames [first, last]; they are laid out frame-aligned (zero queries before and after,
    less than one frame each) so the single-process function runs unchanged on those frames only.
    """
    B, Lp, H, hd = q.shape
    if emo.dim() == 3:  # global variant: every token attends to every expression token
        return expression_attention(q, emo, emo_k_proj, emo_v_proj)
    per = split.length // emo.shape[1]
    grouped = min(per * emo.shape[1] - split.start, split.valid)  # local tokens that belong to a frame
    if per == 0 or grouped <= 0:
        return q.new_zeros(B, Lp, H * hd)
    first, last = split.start // per, (split.start + grouped - 1) // per
    lead = split.start - first * per
    trail = (last + 1) * per - (split.start + grouped)
    aligned = F.pad(q[:, :grouped], (0, 0, 0, 0, lead, trail))  # (B, (last - first + 1) * per, H, hd)
    out = expression_attention(aligned, emo[:, first:last + 1], emo_k_proj, emo_v_proj)[:, lead:lead + grouped]
    return F.pad(out, (0, 0, 0, Lp - grouped))


def _moments(x: torch.Tensor, n: int) -> torch.Tensor:
    """(sum, sum of squares) per sample of x[:, :n] (B, n, D) as fp64 (B, 2); the square sum is built from the
    centred sum so that the global variance does not lose digits to cancellation."""
    if n == 0:
        return torch.zeros(x.shape[0], 2, dtype=torch.float64, device=x.device)
    xf = x[:, :n].float()
    s1 = xf.sum(dim=(1, 2))
    mean = s1 / (n * x.shape[2])
    m2 = (xf - mean[:, None, None]).square().sum(dim=(1, 2))
    s1 = s1.double()
    return torch.stack((s1, m2.double() + s1 * mean.double()), dim=1)


def split_normalise_to(emo: torch.Tensor, base: torch.Tensor, split: TokenSplit, group: dist.ProcessGroup,
                       eps: float = NORM_EPS) -> torch.Tensor:
    """`engine.nfeb.normalise_to` with the per-sample mean / unbiased std taken over the WHOLE window's real
    tokens and channels (one all-reduce); emo, base (B, Lp, D) local -> (B, Lp, D)."""
    stats = torch.stack((_moments(emo, split.valid), _moments(base, split.valid)), dim=1)  # (B, 2, 2)
    if split.world > 1:
        dist.all_reduce(stats, group=group)
    n = split.length * emo.shape[2]
    mean = stats[..., 0] / n
    std = ((stats[..., 1] - stats[..., 0] * mean) / (n - 1)).clamp_min(0).sqrt()  # (B, 2): [emo, base]
    mean, std = mean.float()[:, :, None, None], std.float()[:, :, None, None]
    # fp32 affine map, cast back: as the single-process normalise_to does
    return ((emo.float() - mean[:, 0]) * (std[:, 1] / (std[:, 0] + eps)) + mean[:, 1]).to(emo.dtype)


# --- split-aware attention modules --------------------------------------------------------------------------------
class SequenceParallelSelfAttention(nn.Module):
    """WanSelfAttention on the local tokens (B, Lp, D) -> (B, Lp, D); the attention sees the whole window."""

    def __init__(self, inner: WanSelfAttention, state: _SplitState):
        super().__init__()
        self.inner = inner
        self.state = state

    def forward(self, x, cos, sin):
        q, k, v = self.inner.qkv(x, cos, sin)
        return self.inner.o(ulysses_attention(q, k, v, self.state.split, self.state.group).flatten(2))


class SequenceParallelCrossAttention(nn.Module):
    """WanI2VCrossAttention on the local tokens (B, Lp, D) -> (B, Lp, D): the text/image part is per token with
    the replicated context; the NFEB part uses the split-aware per-frame attention and global statistics."""

    def __init__(self, inner: WanI2VCrossAttention, state: _SplitState):
        super().__init__()
        self.inner = inner
        self.state = state

    def forward(self, x, ctx_img, ctx_txt, emo=None, ip_scale: float = 1.0, kv=None):
        m = self.inner
        q = m.norm_q(m.q(x)).unflatten(-1, (m.num_heads, -1))
        k_img, v_img, k_txt, v_txt = m.context_kv(ctx_img, ctx_txt) if kv is None else kv
        base = (attention(q, k_txt, v_txt) + attention(q, k_img, v_img)).flatten(2)
        per_sample = isinstance(ip_scale, torch.Tensor)  # (B,): e.g. the guidance pair [1, 0] as one batch
        if emo is not None and (per_sample or ip_scale != 0):
            split = self.state.split
            emo_out = split_expression_attention(q, emo, m.emo_k_proj, m.emo_v_proj, split)
            scale = ip_scale.to(base.dtype).view(-1, 1, 1) if per_sample else ip_scale
            base = base + scale * split_normalise_to(emo_out, base, split, self.state.group)
        return m.o(base)


def _with_children(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow copy of `module` (same class, same parameters and forward) with some child modules replaced.
    The block's own forward (modulation, residuals, FFN) then runs unchanged around the split-aware attention."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, **children}
    return clone


def _run_block(block: nn.Module, *args):
    return block(*args)


# --- the model ----------------------------------------------------------------------------------------------------
class SequenceParallelDiT(nn.Module):
    """`WanModel` with one window's tokens split across the sequence group of `groups` (weights shared, not copied).

    forward(x, t, context, clip_fea, y, emo=None, ip_scale=1.0) takes the same (replicated) inputs as
    WanModel.forward on every rank of the sequence group and returns the same (B, out_dim, F, H, W) on each.
    forward_branches(branches, **inputs) runs guidance branches, split over the CFG groups.
    """

    def __init__(self, model: WanModel, groups: ParallelGroups):
        super().__init__()
        self.model = model
        self.groups = groups
        self._state = _SplitState(groups.seq_group)
        self.blocks = nn.ModuleList(
            _with_children(b, self_attn=SequenceParallelSelfAttention(b.self_attn, self._state),
                           cross_attn=SequenceParallelCrossAttention(b.cross_attn, self._state))
            for b in model.blocks)
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.session_kv: list[tuple[torch.Tensor, ...]] | None = None
        self.session_y: torch.Tensor | None = None
        self.frame_offset = 0  # RoPE frame positions start here (set_step_session)
        self._run_block = _run_block

    def compile_blocks(self, **options) -> None:
        """torch.compile one block function that serves every block (same code and shapes; the collectives are
        traced as functional collectives), as kernels/graphs.py does for one GPU. options go to torch.compile.
        Each token count / split compiles once more (dynamo's recompile limit bounds how many shapes stay compiled)."""
        self._run_block = torch.compile(_run_block, **{"dynamic": False, **options})

    def split(self, grid: tuple[int, int, int]) -> TokenSplit:
        return TokenSplit(math.prod(grid), self.groups.seq_size, self.groups.seq_rank)

    def rope(self, grid: tuple[int, int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (Lp, hd/2) of the local tokens at their GLOBAL positions (padding rows are zero)."""
        device = device or self.model.patch_embedding.weight.device
        key = (*grid, self.frame_offset, str(device))
        if key not in self._rope:
            split = self.split(grid)
            cos, sin = self.model.rope(grid, device, frame_offset=self.frame_offset)
            self._rope[key] = (split.shard(cos, 0), split.shard(sin, 0))
        return self._rope[key]

    def forward_tokens(self, tokens, e, e0, cos, sin, ctx_img, ctx_txt, emo=None, ip_scale: float = 1.0, kv=None,
                       split: TokenSplit | None = None):
        """All blocks and the head on the local tokens (B, Lp, D) -> (B, Lp, out_dim * prod(patch)).
        kv: optional per-block context K/V (`model.context_kv(ctx_img, ctx_txt)`, replicated on every rank)."""
        self._state.split = split
        for i, block in enumerate(self.blocks):
            tokens = self._run_block(block, tokens, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale,
                                     None if kv is None else kv[i])
        return self.model.head(tokens, e)

    def gather(self, local: torch.Tensor, split: TokenSplit) -> torch.Tensor:
        """(B, Lp, C) of every rank of the sequence group -> the window's (B, L, C) on each."""
        if split.world == 1:
            return local
        out = local.new_empty(split.world * local.shape[0], *local.shape[1:])  # concatenated over ranks
        _all_gather(out, local.contiguous(), group=self.groups.seq_group)
        return out.unflatten(0, (split.world, -1)).transpose(0, 1).flatten(1, 2)[:, :split.length]

    def set_session(self, context: torch.Tensor, clip_fea: torch.Tensor) -> None:
        """Compute every block's context K/V once (fixed prompt and reference); later calls may pass
        context=None, clip_fea=None to use them."""
        self.session_kv = self.model.context_kv(*self.model.embed_context(context, clip_fea))

    def set_step_session(self, kv: list, y: torch.Tensor, frame_offset: int = 0, split_batch: bool = False) -> None:
        """The fixed-shape step's session (kernels/graphs.CompiledStep.set_session): per-block context K/V (each
        (B, n, H, hd)) and y (B, 20, F, H, W), used by calls that pass context=clip_fea=None and y=None; RoPE frame
        positions from frame_offset. split_batch: keep only this CFG group's contiguous 1/G of the batch (ParallelStep
        sends batch chunk g as guidance branch g)."""
        if split_batch:
            G, g = self.groups.cfg_size, self.groups.cfg_rank
            n = y.shape[0] // G
            kv = [tuple(t[g * n:(g + 1) * n].clone() for t in block) for block in kv]
            y = y[g * n:(g + 1) * n].clone()
        self.session_kv, self.session_y, self.frame_offset = kv, y, frame_offset

    def forward(self, x, t, context, clip_fea, y, emo=None, ip_scale: float = 1.0, kv=None):
        """Flow prediction (B, out_dim, F, H, W), identical on every rank of the sequence group.

        kv: per-block context K/V (`model.context_kv(...)`); with context and clip_fea None, the session's.
        y None: the session's (set_step_session)."""
        m = self.model
        if y is None:
            if self.session_y is None:
                raise RuntimeError("No y given and no step session set: call set_step_session(kv, y) first.")
            y = self.session_y
        if kv is None and context is None and clip_fea is None:
            if self.session_kv is None:
                raise RuntimeError("No context given and no session set: call set_session(context, clip_fea) first.")
            kv = self.session_kv
        ctx_img, ctx_txt = (None, None) if kv is not None else m.embed_context(context, clip_fea)
        tokens, grid = m.patchify(x, y)  # the whole window: a strided conv, cheap next to the blocks
        split = self.split(grid)
        cos, sin = self.rope(grid, tokens.device)
        e, e0 = m.embed_time(t)
        if emo is not None:
            emo = emo.to(tokens.dtype)
        local = split.shard(tokens).contiguous()  # same strides as every later block input: one compile serves all
        out = self.forward_tokens(local, e, e0, cos, sin, ctx_img, ctx_txt, emo, ip_scale, kv, split)
        return m.unpatchify(self.gather(out, split).float(), grid)

    def forward_branches(self, branches: Sequence[dict], **inputs) -> torch.Tensor:
        """Guidance branches, e.g. [{"ip_scale": 1.0}, {"ip_scale": 0.0}]: each is `forward(**inputs, **branch)`.

        CFG group g runs branches g, g + G, ...; one all_gather among the ranks of equal sequence rank gives
        every rank all of them: returns (len(branches), B, out_dim, F, H, W) in branch order.
        """
        G, g = self.groups.cfg_size, self.groups.cfg_rank
        if len(branches) % G:
            raise ValueError(f"{len(branches)} guidance branches do not split over {G} CFG groups: "
                             f"use a CFG group count that divides {len(branches)}.")
        mine = torch.stack([self.forward(**{**inputs, **b}) for b in branches[g::G]])  # (n/G, B, ...)
        if G == 1:
            return mine
        out = mine.new_empty(G * mine.shape[0], *mine.shape[1:])  # concatenated over CFG groups
        _all_gather(out, mine, group=self.groups.cfg_group)
        return out.unflatten(0, (G, -1)).transpose(0, 1).flatten(0, 1)  # [j, g] -> branch j * G + g


# --- rank 0 drives, the others follow -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TensorSlot:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _strip(obj, tensors: list):
    """Replace the tensors in nested dicts/lists/tuples by slots, collecting them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj, tensors: list):
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


_DRIVEN = ("forward", "forward_branches", "set_session", "set_step_session")


class Driver:
    """Rank 0's handle on a SequenceParallelDiT that every rank runs.

    driver(**forward inputs), driver.branches(branches, **inputs) or driver.set_session(context, clip_fea) broadcasts
    the call (a small pickled header,
    then the tensors from rank 0) and runs it here; the other ranks run the same call inside `follow(model)`.
    close() releases them. Use it on rank 0 wherever the renderer would call the DiT. Calls from several threads
    are serialised (a call is a sequence of collectives that must not interleave with another's, or with close()).
    """

    def __init__(self, model: SequenceParallelDiT):
        if dist.get_rank() != 0:
            raise RuntimeError("Driver runs on rank 0 only: the other ranks call follow(model).")
        self.model = model
        self.lock = threading.Lock()
        self.closed = False

    def _call(self, method: str, kwargs: dict):
        with self.lock:
            if self.closed:
                raise RuntimeError("The DiT ranks were released (Driver.close / shutdown): no more DiT calls.")
            tensors: list[torch.Tensor] = []
            stripped = _strip(kwargs, tensors)
            dist.broadcast_object_list([(method, stripped)], src=0)
            device = _device_of(self.model)
            tensors = [t.to(device).contiguous() for t in tensors]
            for t in tensors:
                dist.broadcast(t, src=0)
            return getattr(self.model, method)(**_fill(stripped, tensors))

    def set_session(self, context: torch.Tensor, clip_fea: torch.Tensor) -> None:
        """Every rank computes the session's context K/V (then pass context=None, clip_fea=None per call)."""
        self._call("set_session", dict(context=context, clip_fea=clip_fea))

    def __call__(self, x, t, context, clip_fea, y, emo=None, ip_scale: float = 1.0):
        return self._call("forward", dict(x=x, t=t, context=context, clip_fea=clip_fea, y=y, emo=emo,
                                          ip_scale=ip_scale))

    def branches(self, branches: Sequence[dict], **inputs):
        return self._call("forward_branches", dict(branches=list(branches), **inputs))

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                dist.broadcast_object_list([None], src=0)


def follow(model: SequenceParallelDiT) -> int:
    """On ranks other than 0: run every call rank 0's Driver makes, until it closes. Returns the call count."""
    device = _device_of(model)
    calls = 0
    while True:
        header = [None]
        dist.broadcast_object_list(header, src=0)
        if header[0] is None:
            return calls
        method, kwargs = header[0]
        if method not in _DRIVEN:
            raise RuntimeError(f"rank 0 asked for {method!r}, which a follower does not run.")
        slots: list[_TensorSlot] = []
        _collect_slots(kwargs, slots)
        tensors = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in sorted(slots, key=lambda s: s.index)]
        for t in tensors:
            dist.broadcast(t, src=0)
        getattr(model, method)(**_fill(kwargs, tensors))
        calls += 1


def _collect_slots(obj, slots: list) -> None:
    if isinstance(obj, _TensorSlot):
        slots.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, slots)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_slots(v, slots)


# --- the renderer's step over the group ----------------------------------------------------------------------------
def world_size() -> int:
    """Ranks in this process's group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def make_step(model: WanModel, shape: StepShape, runtime: RuntimeConfig | None = None):
    """The renderer's fixed-shape DiT step: a ParallelStep over the group when there are several ranks (this is
    rank 0; the others run `follower`), else kernels/graphs.CompiledStep."""
    if world_size() > 1:
        return ParallelStep(model, shape, runtime)
    return CompiledStep(model, shape, runtime)


def prepare_model(model: WanModel, runtime: RuntimeConfig) -> WanModel:
    """What CompiledStep does to the model before it runs (attention backend, fused FFN, FP8 linears): every rank
    applies the same, in place, so each holds the same modules."""
    attention_backend.configure(runtime)
    fused.set_fused_kernels(runtime.fused_kernels)
    if runtime.fused_kernels:
        fused.fuse_ffn_gelu(model)
    if runtime.fp8:
        from kernels.fp8 import quantize_linears

        quantize_linears(model)
    return model


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, in module order (the same on every rank for one architecture)."""
    return [*model.named_parameters(), *model.named_buffers()]


def _parallel_dit(model: WanModel, runtime: RuntimeConfig, cfg_size: int) -> SequenceParallelDiT:
    """The same on every rank, in the same order (make_groups is collective)."""
    dit = SequenceParallelDiT(prepare_model(model, runtime), make_groups(cfg_size=cfg_size))
    if runtime.compile and _device_of(model).type == "cuda":
        dit.compile_blocks()
    return dit


_state = {"step": None, "released": False}  # rank 0: its ParallelStep, and whether the followers were released


class ParallelStep:
    """kernels/graphs.CompiledStep's interface (set_session, write_inputs, run, __call__, capture; x/t/emo/ip_scale
    buffers, shape, compiled, use_graph) on rank 0, running the sequence-parallel DiT on every rank through a
    Driver (the other ranks run `follower`). One per process.

    Construction sends the followers the model's config, runtime and the CFG layout, then every weight (so the DiT is
    rank 0's, bit for bit). The guidance pair (batch 2) goes to 2 CFG groups when the world size is even (one
    branch per group, no sequence traffic between them: 1.84x on 2 H100s for 14b, against 1.72x for the sequence
    split, bench/results/dit_parallel_14b_h100x2.json), else runs as one batch over the sequence ranks. No CUDA
    graph (the step has collectives between its kernels); the blocks are compiled on CUDA when runtime.compile.
    """

    def __init__(self, model: WanModel, shape: StepShape, runtime: RuntimeConfig | None = None):
        runtime = runtime or RuntimeConfig()
        if dist.get_rank() != 0:
            raise RuntimeError("ParallelStep runs on rank 0 only: the other ranks call follower(info).")
        if _state["step"] is not None or _state["released"]:
            raise RuntimeError("One ParallelStep per process (the followers hold one DiT): share the engine "
                               "between sessions, or run one flashlive process per model.")
        world = dist.get_world_size()
        self.cfg_size = 2 if shape.batch % 2 == 0 and world % 2 == 0 else 1
        weights = _weights(model)
        dtypes = [t.dtype for _, t in weights]
        dist.broadcast_object_list([("setup", model.cfg, runtime, self.cfg_size,
                                     [(n, tuple(t.shape)) for n, t in weights], dtypes)], src=0)
        with torch.no_grad():
            for _, t in weights:  # NCCL sends contiguous memory only; the followers' tensors are contiguous
                dist.broadcast(t.data if t.is_contiguous() else t.data.contiguous(), src=0)
        _state["step"] = self
        self.model = model.eval()
        self.shape, self.runtime = shape, runtime
        self.dit = _parallel_dit(model, runtime, self.cfg_size)
        self.driver = Driver(self.dit)
        param = model.patch_embedding.weight
        self.device, self.dtype = param.device, param.dtype
        cfg, dev = model.cfg, self.device
        B, F, H, W = shape.batch, shape.frames, shape.height, shape.width
        # Inputs are staged as in CompiledStep (same write_inputs): callers may pass Python floats or tensors.
        self.x = torch.zeros(B, cfg.out_dim, F, H, W, device=dev)
        self.t = torch.zeros(B, device=dev)
        self.emo = torch.zeros(B, F, cfg.emo_tokens_per_frame, cfg.emo_dim, device=dev, dtype=self.dtype)
        self.ip_scale = torch.zeros(B, device=dev)
        self.compiled = runtime.compile and dev.type == "cuda"
        self.use_graph = False
        self.graph = None
        self.layers = None
        self.world_size = world
        self.session_set = False
        self._warm = False

    write_inputs = CompiledStep.write_inputs

    @torch.no_grad()
    def set_session(self, context: torch.Tensor | None, clip_fea: torch.Tensor | None, y: torch.Tensor,
                    frame_offset: int = 0, kv: list | None = None) -> None:
        """As CompiledStep.set_session: every rank receives the context K/V (or computes nothing: they come from
        here) and y once per session."""
        if kv is None:
            kv = self.model.context_kv(*self.model.embed_context(context, clip_fea))
        self.driver._call("set_step_session", dict(kv=list(kv), y=y, frame_offset=frame_offset,
                                                   split_batch=self.cfg_size > 1))
        self.session_set = True
        if self.compiled and not self._warm:
            # The renderer warms a step up by capturing its CUDA graph; this one has none, so its first call (every
            # rank compiles its blocks) runs here, inside the engine's warm-up, not in a session's first window.
            self.run()
            self._warm = True

    def capture(self, warmup: int = 2) -> None:
        """No CUDA graph over collectives: nothing to capture."""

    @property
    def pool(self):
        return None

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        """One DiT call on the staged inputs over every rank -> flow (B, 16, F, H, W) fp32."""
        if not self.session_set:
            raise RuntimeError("ParallelStep.set_session(context, clip_fea, y) must run before the first step.")
        inputs = dict(context=None, clip_fea=None, y=None)
        if self.cfg_size == 1:
            return self.driver(x=self.x, t=self.t, emo=self.emo, ip_scale=self.ip_scale, **inputs)
        n = self.x.shape[0] // self.cfg_size  # batch chunk g is CFG group g's branch (its session slice)
        chunks = [dict(x=self.x[g * n:(g + 1) * n], t=self.t[g * n:(g + 1) * n], emo=self.emo[g * n:(g + 1) * n],
                       ip_scale=self.ip_scale[g * n:(g + 1) * n]) for g in range(self.cfg_size)]
        return self.driver.branches(chunks, **inputs).flatten(0, 1)

    def __call__(self, x: torch.Tensor, t, emo: torch.Tensor | None = None, ip_scale=1.0) -> torch.Tensor:
        """As CompiledStep.__call__; the result is a new tensor each call."""
        self.write_inputs(x, t, emo, ip_scale)
        return self.run()


def shutdown() -> None:
    """Rank 0, at exit: release the followers, whether they wait for the ParallelStep or follow it. Idempotent."""
    if world_size() == 1 or dist.get_rank() != 0 or _state["released"]:
        return
    _state["released"] = True
    if _state["step"] is not None:
        _state["step"].driver.close()  # waits for a DiT call in flight on another thread
    else:
        dist.broadcast_object_list([None], src=0)


def follower(info: DistInfo) -> int:
    """Ranks > 0: wait for rank 0's ParallelStep (or shutdown), build the same DiT from the config and weights it
    sends, then run every call it makes until shutdown. Returns the number of calls run."""
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C reaches every process of the terminal's group; rank 0 alone decides when its followers end (a
        # follower that stopped mid-call would leave rank 0 blocked in a collective).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    header = [None]
    dist.broadcast_object_list(header, src=0)
    if header[0] is None:
        return 0
    _, cfg, runtime, cfg_size, shapes, dtypes = header[0]
    with torch.device("meta"):
        model = WanModel(cfg)
    model = model.to_empty(device=info.device).eval().requires_grad_(False)
    weights = _weights(model)
    if [(n, tuple(t.shape)) for n, t in weights] != shapes:
        raise RuntimeError("Rank 0's DiT has other parameters than WanModel(cfg) here: run the same FlashLive "
                           "version on every rank.")
    with torch.no_grad():
        for (_, t), dtype in zip(weights, dtypes):
            if t.dtype != dtype:
                t.data = t.data.to(dtype)
            dist.broadcast(t.data, src=0)
    calls = follow(_parallel_dit(model, runtime, cfg_size))
    print(f"flashlive rank {info.rank}: released after {calls} DiT calls", file=sys.stderr, flush=True)
    return calls


__all__ = ["DistInfo", "Driver", "ParallelGroups", "ParallelStep", "SequenceParallelDiT", "TokenSplit", "follow",
           "follower", "free_port", "init_distributed", "make_groups", "make_step", "prepare_model", "shutdown",
           "spawn", "split_expression_attention", "split_normalise_to", "start_followers", "ulysses_attention",
           "world_size"]
