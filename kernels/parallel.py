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
                      (L // F), the grouping of `engine.models.nfeb.expression_attention`); the mean / unbiased std over
                      (tokens, channels) of the sample come from one all-reduce of per-rank moments.
    head              per token, so it runs on the local tokens; only its small output (out_dim * 4 channels) is
                      all-gathered, then unpatchified on every rank.

CFG: a world of G * P ranks is G CFG groups of P sequence ranks (rank = g * P + s). Group g computes guidance
branches g, g + G, ...; the outputs are exchanged with one all_gather among the ranks of equal s, so every rank
ends with every branch (`SequenceParallelDiT.forward_branches`).

The process group, the launcher (rank 0 drives, the others follow) and the renderer's multi-GPU step live in
`engine/distributed.py`; this module is the math over a group that exists: `make_groups`, the token split, the
collectives around attention and NFEB, and `SequenceParallelDiT`. It knows the DiT only through the modules it is
given (a WanModel's blocks, their attention modules, the NFEB projections and epsilon they carry).

Heads must split over the sequence ranks to avoid padding work: 14b (40 heads) takes 2, 4, 5 or 8 sequence ranks at
full efficiency, 1.3b (12 heads) 2, 3, 4 or 6.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention, frame_attention

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (same arguments); older GPU hosts have only the former.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


def split_expression_attention(q: torch.Tensor, emo: torch.Tensor, emo_k_proj: nn.Module, emo_v_proj: nn.Module,
                               split: TokenSplit) -> torch.Tensor:
    """NFEB's per-frame expression attention (`engine.models.nfeb.expression_attention`) for this rank's tokens:
    q (B, Lp, H, hd), emo (B, F, T, E) tokens per latent frame, emo_k_proj / emo_v_proj the block's projections
    (E -> H*hd) -> (B, Lp, H*hd).

    Token i of the window belongs to latent frame i // (L // F); tokens past floor(L/F)*F, and padding, get zeros.
    The local tokens cover frames [first, last]; they are laid out frame-aligned (zero queries before and after,
    less than one frame each) so the per-frame attention runs unchanged on those frames only.
    """
    B, Lp, H, hd = q.shape
    if emo.dim() == 3:  # global variant: every token attends to every expression token
        return attention(q, emo_k_proj(emo).unflatten(-1, (H, hd)), emo_v_proj(emo).unflatten(-1, (H, hd))).flatten(2)
    per = split.length // emo.shape[1]
    grouped = min(per * emo.shape[1] - split.start, split.valid)  # local tokens that belong to a frame
    if per == 0 or grouped <= 0:
        return q.new_zeros(B, Lp, H * hd)
    first, last = split.start // per, (split.start + grouped - 1) // per
    lead = split.start - first * per
    trail = (last + 1) * per - (split.start + grouped)
    aligned = F.pad(q[:, :grouped], (0, 0, 0, 0, lead, trail))  # (B, (last - first + 1) * per, H, hd)
    mine = emo[:, first:last + 1]
    shape = (*mine.shape[:3], H, hd)
    out = frame_attention(aligned, emo_k_proj(mine).reshape(shape), emo_v_proj(mine).reshape(shape))
    return F.pad(out[:, lead:lead + grouped], (0, 0, 0, Lp - grouped))


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
                       eps: float) -> torch.Tensor:
    """`engine.models.nfeb.normalise_to` with the per-sample mean / unbiased std taken over the WHOLE window's real
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

    def __init__(self, inner: nn.Module, state: _SplitState):
        super().__init__()
        self.inner = inner
        self.state = state

    def forward(self, x, cos, sin):
        q, k, v = self.inner.qkv(x, cos, sin)
        return self.inner.o(ulysses_attention(q, k, v, self.state.split, self.state.group).flatten(2))


class SequenceParallelCrossAttention(nn.Module):
    """WanI2VCrossAttention on the local tokens (B, Lp, D) -> (B, Lp, D): the text/image part is per token with
    the replicated context; the NFEB part uses the split-aware per-frame attention and global statistics."""

    def __init__(self, inner: nn.Module, state: _SplitState):
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
            base = base + scale * split_normalise_to(emo_out, base, split, self.state.group, m.norm_eps)
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
    """A WanModel (engine/models/dit.py) with one window's tokens split across the sequence group of `groups` (weights shared, not copied).

    forward(x, t, context, clip_fea, y, emo=None, ip_scale=1.0) takes the same (replicated) inputs as
    WanModel.forward on every rank of the sequence group and returns the same (B, out_dim, F, H, W) on each.
    forward_branches(branches, **inputs) runs guidance branches, split over the CFG groups.
    """

    def __init__(self, model: nn.Module, groups: ParallelGroups):
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
