"""Several GPUs of one host: the process group, the launcher, and the renderer's DiT step over the group.

Launch (NCCL on GPU, gloo on CPU; NCCL's NVLink multicast is kept off: NCCL_NVLS_ENABLE=0). flashlive.py does:

    torchrun --nproc_per_node N -m flashlive serve ...  ->  info = init_distributed()   # on every rank
    flashlive serve --gpus N                           ->  info, children = start_followers(follower, N)   # rank 0
    rank 0: the command as usual; engine/flashportrait.py's _build_step calls make_step(model, shape, runtime), which
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

The sequence-parallel math (token split, Ulysses attention, NFEB over a split, SequenceParallelDiT) is
`kernels/parallel.py`. Only rank 0 touches the network, the camera and the encoder; the other ranks only ever run
DiT calls.
"""
from __future__ import annotations

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
from torch import nn

from engine.config import RuntimeConfig
from engine.models.dit import WanModel
from kernels import attention as attention_backend
from kernels import fused
from kernels.graphs import CompiledStep, StepShape
from kernels.parallel import SequenceParallelDiT, make_groups


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
    runtime = runtime or RuntimeConfig()
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

        quantize_linears(model, rowwise=runtime.fp8_scaling != "tensorwise")
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


# --- flashlive serve/render over several ranks ------------------------------------------------------------------
def join_group(args):  # args: flashlive's serve/render flags
    """(DistInfo, follower processes or None) when serve/render runs over several ranks (--gpus N > 1: this process
    is rank 0 and starts N - 1 followers; torchrun: RANK / WORLD_SIZE say which rank this is), else None."""
    if args.command not in ("serve", "render"):
        return None
    gpus = args.gpus
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun's environment: this is the entry point
    if gpus < 1:
        raise ValueError(f"--gpus {gpus} is not a GPU count: pass --gpus 1 or more.")
    if gpus == 1 and not launched:
        return None
    if args.renderer != "flashportrait":
        raise ValueError("Several GPUs run the flashportrait DiT: pass --renderer flashportrait (preview needs one "
                         "CPU).")
    if launched and gpus > 1:
        raise ValueError("torchrun already starts one process per GPU: drop --gpus, or run flashlive without torchrun.")
    device = "cpu" if (args.device or "cuda").startswith("cpu") else "cuda"
    if device == "cuda" and not launched and torch.cuda.device_count() < gpus:
        raise ValueError(f"--gpus {gpus} needs {gpus} visible GPUs and torch sees {torch.cuda.device_count()}: "
                         f"pass --gpus {max(torch.cuda.device_count(), 1)}.")
    # Followers wait for rank 0's next DiT call for as long as it serves (or loads a large model): days, not
    # torch's default minutes. A rank 0 that dies takes its followers along (parent-death signal / torchrun).
    wait = timedelta(days=30)
    if launched:
        return init_distributed(device, timeout=wait), None
    return start_followers(follower, gpus, device=device, timeout=wait)


def release_group(children) -> None:
    """Rank 0 at exit: release the followers, wait for them (a minute at most), leave the group."""
    try:
        shutdown()
    finally:
        if children is not None:
            try:
                for _ in range(60):
                    if children.join(timeout=1):
                        break
            finally:
                for proc in children.processes:
                    if proc.is_alive():
                        proc.terminate()
        dist.destroy_process_group()
