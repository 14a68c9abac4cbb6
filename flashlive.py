"""The `flashlive` command: serve, render, doctor, bench.

    flashlive serve                                   # bundled portrait, preview renderer, http://127.0.0.1:8080/
    flashlive serve --reference me.jpg --driving /dev/video0 --vcam --record show.mp4
    flashlive render --driving talk.mp4 --reference me.jpg -o avatar.mp4
    flashlive serve --renderer flashportrait --gpus 4                # the DiT over 4 GPUs (or torchrun -m flashlive)
    flashlive doctor [--weights DIR --preset 14b]
    flashlive bench stream_latency [args...]          # runs bench/stream_latency.py

Flags become the config dataclasses of engine/config.py (StreamConfig, RuntimeConfig, SamplerConfig, WindowConfig,
ALPAConfig); nothing below reads the environment but torchrun's (WORLD_SIZE / RANK: one rank of several GPUs).
User errors print one sentence naming the fix and exit 1.
"""
from __future__ import annotations

import argparse
import os
import runpy
import shutil
import socket
import sys
from pathlib import Path
from typing import NoReturn

from engine.build import idle_image, load_reference, renderer_factory, warm_start

ROOT = Path(__file__).resolve().parent
RENDERERS = ("preview", "flashportrait")


# --- flags -> config dataclasses ---------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    if w < 64 or h < 64 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"size {text!r} must be even and at least 64x64")
    return w, h


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number: pass 0 (any free port) to 65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range: pass 0 (any free port) to 65535")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text} s is out of range: pass more than 0 and less than 3600 seconds")
    return value


def _add_renderer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("renderer")
    g.add_argument("--renderer", choices=RENDERERS, default="preview",
                   help="preview: face-mesh warp, no weights, CPU; flashportrait: the diffusion model (GPU, weights)")
    g.add_argument("--reference", default=None, help="portrait image (JPEG/PNG); default: the bundled portrait")
    g.add_argument("--size", type=_size, default=(512, 512), help="output WIDTHxHEIGHT (default 512x512)")
    g.add_argument("--fps", type=float, default=None, help="output fps (serve: default 25; render: the driving fps)")
    g.add_argument("--weights", default="weights", help="folder with the FlashPortrait / Wan2.1 checkpoints")
    g.add_argument("--preset", default="14b",
                   help="model preset: tiny, mini (trained here: CPU, 128x128), 1.3b or 14b (flashportrait)")
    g.add_argument("--device", default=None, help="torch device for flashportrait (default cuda)")
    g.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (flashportrait; default bf16)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (flashportrait)")
    g.add_argument("--fast", action="store_true", default=None, help="4-step distilled schedule (flashportrait)")
    g.add_argument("--emo-cfg", type=float, default=None, help="expression guidance scale (flashportrait)")
    g.add_argument("--context-size", type=int, default=None, help="WSWS window, latent frames (flashportrait)")
    g.add_argument("--context-overlap", type=int, default=None, help="WSWS overlap, latent frames (flashportrait)")
    g.add_argument("--alpa", default=None, help="off, alpa, taylorseer or teacache (flashportrait)")
    g.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="skip torch.compile and CUDA graphs (flashportrait)")
    g.add_argument("--random-weights", action="store_true",
                   help="flashportrait with random weights at the preset's size: timing without downloads")
    g.add_argument("--latency-target-ms", type=float, default=None,
                   help="flashportrait: the controller trades ALPA interval, steps, stride and lookahead to stay "
                        "within this server-side latency (default for serve: 350; the network adds its own)")
    g.add_argument("--decoder", choices=("tiny", "wan"), default=None,
                   help="flashportrait latent decoder: tiny (TAEHV, real time) or wan (full Wan VAE)")
    g.add_argument("--fp8", choices=("auto", "on", "off"), default="auto",
                   help="flashportrait: e4m3 weights for the DiT block linears inside the compiled step (auto: on "
                        "for --preset 14b on a GPU with FP8 matmuls, compute capability 8.9+)")
    g.add_argument("--fp8-scaling", choices=("rowwise", "tensorwise"), default=None,
                   help="flashportrait FP8: a scale per token and per weight row (rowwise, default: accurate) or one "
                        "per tensor (tensorwise: faster GEMMs, coarser)")
    g.add_argument("--low-vram", action="store_true",
                   help="flashportrait: the 24 GB mode (RTX 4090/5090): the DiT built or loaded block by block "
                        "straight into FP8, CLIP and the Wan VAE encoder freed once the conditioning exists")
    g.add_argument("--emo-refresh", type=int, default=None,
                   help="flashportrait: compute the no-expression guidance branch at one expression full pass in N "
                        "and estimate it from the last guidance difference in between (1: every pass; default: "
                        "4 for --preset 14b, else 1)")
    g.add_argument("--gpus", type=int, default=1,
                   help="flashportrait: spread the DiT over N GPUs of this host (guidance pair and sequence split; "
                        "rank 0 runs the command); or launch N processes with torchrun --nproc_per_node N")


def stream_config(args):
    from engine.config import StreamConfig, replace

    width, height = args.size
    return replace(StreamConfig(), host=args.host, port=args.port, fps=args.fps, width=width, height=height,
                   playout_frames=args.playout, input_queue=args.input_queue, driving=args.driving,
                   vcam=args.vcam or None, record=args.record, allow_hosts=tuple(args.allow_host),
                   allow_origins=tuple(args.allow_origin), ice_servers=tuple(args.ice_server),
                   handshake_timeout_s=args.handshake_timeout, peer_timeout_s=args.peer_timeout)


# --- serve -------------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from streaming import server as srv

    tls = tls_context(args.cert, args.key)
    if args.input_queue is None and args.renderer == "preview":
        args.input_queue = 1  # a backlog only adds latency when every frame is rendered on its own
    cfg = stream_config(args)
    from streaming.ice import rtc_configuration

    rtc_configuration(cfg.ice_servers)  # a bad --ice-server fails now, before any model loads
    reference = load_reference(args.reference, args.renderer)
    make, device = renderer_factory(args, reference, cfg.width, cfg.height, cfg.input_queue, fps=cfg.fps)
    if args.driving:
        from streaming.capture import open_video

        open_video(args.driving).close()  # a bad path fails here, in one sentence, not in a thread later
    idle = idle_image(args.renderer, make, reference, cfg.width, cfg.height)
    info = {}  # labels at the top of /stats and on the page
    if args.renderer == "flashportrait":
        print(f"FlashLive: warming up the flashportrait engine (preset {args.preset}, {device}"
              f"{', random weights' if args.random_weights else ''}): loading, compiling and timing can take "
              "minutes; progress follows.", flush=True)
        warm = warm_start(make)  # the shared engine loads, compiles, captures and rehearses before the first peer
        from engine.distributed import world_size

        from engine.build import engine_configs

        runtime = engine_configs(args)["runtime"]
        info = {"preset": args.preset, "random_weights": bool(args.random_weights), "warm_up_s": round(warm, 2),
                "gpus": world_size(), "fp8": runtime.fp8, "low_vram": runtime.low_vram}
        print(f"FlashLive flashportrait engine is warm after {warm:.1f} s (load, compile, "
              f"CUDA graph capture){', random weights' if args.random_weights else ''}", flush=True)
    if args.loopback_ice:
        srv.restrict_ice_to_loopback()
    server = srv.AvatarServer(cfg, make, idle, renderer_name=args.renderer, device=device,
                              max_sessions=args.max_sessions, vcam_device=args.vcam_device, info=info)

    def ready(url: str) -> None:
        print(f"FlashLive ({args.renderer} renderer) is serving {url}  (OBS viewer: {url}viewer)", flush=True)
        if cfg.host not in ("127.0.0.1", "localhost", "::1") and args.cert is None:
            print("Other machines: browsers share a camera only with https or localhost pages; pass --cert/--key "
                  "or use an SSH tunnel.", flush=True)

    srv.run(server, ready, ssl_context=tls)
    return 0


def tls_context(cert: str | None, key: str | None):
    """An ssl.SSLContext from --cert/--key (PEM files), or None for plain http."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--cert and --key go together: pass both PEM files (e.g. from mkcert) or neither.")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"Cannot load the TLS certificate {cert} / key {key} ({err}): pass PEM files that "
                         "belong together.") from None
    return context


# --- render ------------------------------------------------------------------------------------------------------
def cmd_render(args) -> int:
    from tqdm import tqdm

    from streaming.capture import open_video
    from streaming.sinks import Mp4Writer

    reference = load_reference(args.reference, args.renderer)
    src = open_video(args.driving)
    if args.driving.startswith("/dev/"):
        src.close()
        raise ValueError("render needs a video file, not a camera: record one first or use flashlive serve.")
    video = src.streams.video[0]
    audio = src.streams.audio[0] if src.streams.audio else None
    fps = args.fps or video.average_rate or video.guessed_rate
    width, height = args.size
    output = Path(args.output or f"{Path(args.driving).stem}-{Path(args.reference or 'portrait').stem}.mp4")
    make, _ = renderer_factory(args, reference, width, height, fps=float(fps), offline=True)
    renderer = make()  # not started: render calls process() directly so no driving frame is ever dropped
    frames_in = frames_out = 0
    try:
        with Mp4Writer(output, width, height, fps, audio_template=audio) as writer, \
                tqdm(total=video.frames or None, unit="frame", desc="render", disable=args.quiet) as bar:
            for frame in decode(src, video, args.driving):
                for image, _ in renderer.process(frame.to_ndarray(format="rgb24"), float(frame.time or 0)):
                    writer.write(image)
                    frames_out += 1
                frames_in += 1
                bar.update(1)
            for image, _ in getattr(renderer, "flush", lambda: [])():  # renderers that hold back a window
                writer.write(image)
                frames_out += 1
            if audio is not None:
                copy_audio(args.driving, writer, video)
    finally:
        src.close()
        renderer.close()
    missed = getattr(renderer, "faces_missed", 0)
    note = f"; no face in {missed} driving frames (the portrait held still there)" if missed else ""
    print(f"wrote {output}: {frames_out} frames at {float(fps):g} fps"
          f"{', audio copied' if audio is not None else ', no audio in the driving video'}{note}")
    return 0


def decode(container, stream, path: str):
    """Decoded frames of `stream`; a corrupt file is one sentence (ValueError), not a codec traceback."""
    import av

    frames = container.decode(stream)
    index = 0
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.FFmpegError as err:
            raise ValueError(f"{path} could not be decoded past frame {index} ({err}): re-encode it, e.g. with "
                             "ffmpeg -i IN -c:v libx264 OUT.mp4.") from None
        index += 1
        yield frame


def copy_audio(path: str, writer, video) -> None:
    """Remux the first audio stream of `path` into `writer` unchanged, kept in sync with the video stream."""
    import av

    with av.open(path) as src:
        audio = src.streams.audio[0]
        v0 = (video.start_time or 0) * video.time_base  # the video's first frame is t=0 of the output
        shift = round(v0 / audio.time_base) if v0 else 0
        for packet in src.demux(audio):
            # Negative times stay: AAC priming packets (pts < 0) are trimmed by the mp4 edit list, as in the source.
            writer.mux_audio(packet, shift)


# --- doctor ------------------------------------------------------------------------------------------------------
def _check_gpu():
    try:
        import torch
    except ImportError:
        return False, "torch is not installed: pip install torch (the CUDA build for a GPU)."
    if not torch.cuda.is_available():
        return False, (f"no CUDA GPU visible to torch {torch.__version__}: the preview renderer works on CPU; "
                       "flashportrait needs an NVIDIA GPU and the CUDA build of torch.")
    props = torch.cuda.get_device_properties(0)
    return True, (f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def _check_weights(weights: str, preset: str):
    try:
        from engine.weights import scan_weights
        rows = scan_weights(weights, preset)
    except ImportError as err:
        return [(False, f"weights cannot be checked yet ({err.name} is missing): update FlashLive.")]
    except ValueError as err:
        return [(False, str(err))]
    return [(ok, f"{name}: {msg}") for name, ok, msg in rows]


def _check_v4l2loopback():
    if sys.platform != "linux":
        return True, "--vcam uses OBS Virtual Camera on this system (install OBS if it is missing)"
    if Path("/sys/module/v4l2loopback").exists():
        devices = sorted("/dev/" + d.name for d in Path("/sys/devices/virtual/video4linux").glob("video*"))
        return True, f"v4l2loopback loaded, virtual camera devices: {', '.join(devices) or 'none'}"
    return False, ("v4l2loopback is not loaded (only --vcam needs it): sudo apt-get install v4l2loopback-dkms && "
                   "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=FlashLive")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _check_chromium():
    path = find_chromium()
    if path:
        return True, f"{path} (the browser tests use it headless)"
    return False, ("no Chromium found (only the browser tests need it): sudo apt-get install -y "
                   "--no-install-recommends chromium")


def _check_port(host: str, port: int):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            return False, f"{host}:{port} is not free ({err.strerror}): pass --port N to flashlive serve."
    return True, f"{host}:{port} is free"


def _check_packages():
    missing = []
    for name in ("aiortc", "av", "aiohttp", "mediapipe", "cv2", "pyvirtualcam"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        return False, f"missing Python packages {', '.join(missing)}: pip install -e . in the FlashLive checkout."
    import aiortc
    import av
    import mediapipe

    return True, f"aiortc {aiortc.__version__}, av {av.__version__}, mediapipe {mediapipe.__version__}"


def cmd_doctor(args) -> int:
    """Each line: OK, FIX (with the fix) or NOTE (an optional feature that is unavailable). Exit 1 when any line
    says FIX: something `flashlive serve --renderer R` needs is missing or broken."""
    checks = [("packages", _check_packages(), True), ("port", _check_port(args.host, args.port), True)]
    if args.renderer == "flashportrait":
        checks += [("gpu", _check_gpu(), True)]
        checks += [("weights", row, True) for row in _check_weights(args.weights, args.preset)]
    checks += [("vcam", _check_v4l2loopback(), False), ("chromium", _check_chromium(), False)]
    failed = False
    for name, (ok, message), essential in checks:
        print(f"{'OK  ' if ok else 'FIX ' if essential else 'NOTE'}  {name:<9} {message}")
        failed |= essential and not ok
    return 1 if failed else 0


# --- bench -------------------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    bench_dir = ROOT / "bench"
    script = bench_dir / f"{args.name}.py"
    if not script.is_file():
        names = sorted(p.stem for p in bench_dir.glob("*.py") if p.stem not in ("common", "__init__"))
        if not names:
            raise ValueError("The bench scripts live in the FlashLive source checkout: run flashlive bench from a "
                             "clone installed with pip install -e .")
        raise ValueError(f"No bench script {args.name!r}: choose one of {', '.join(names)}.")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(ROOT))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def run_command(args) -> int:
    """args.func(args) here, or on rank 0 of a group of DiT ranks (the other ranks follow its DiT calls)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun's environment: this is the entry point
    if args.command not in ("serve", "render") or (args.gpus == 1 and not launched):
        return args.func(args)
    from engine.distributed import follower, join_group, release_group

    group = join_group(args)
    if group is None:
        return args.func(args)
    info, children = group
    if info.rank != 0:  # torchrun's other ranks: only DiT work, no network, camera or files
        import torch.distributed as dist

        try:
            follower(info)
        finally:
            dist.destroy_process_group()
        leave_launched(0)
    try:
        code = args.func(args)
    finally:
        release_group(children)
    if launched:
        leave_launched(code)
    return code


def leave_launched(code: int) -> NoReturn:
    """A torchrun rank ends here once its group is left and its files are closed: os._exit skips the interpreter's
    teardown, whose C++ static destructors, in a process that ran gloo and mediapipe's graph threads, aborted about one
    exit in ten ("terminate called without an active exception", SIGABRT after the video was written), which torchrun
    reports as a failed run. (Spawned followers already end so: multiprocessing exits its children with os._exit.)"""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- main --------------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with a bad flag reported as one line (no usage block), exit status 2."""

    def error(self, message: str):
        message = message.rstrip(".")
        print(f"{self.prog}: {message[0].upper() + message[1:]} (see {self.prog} --help).", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flashlive", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="WebRTC server: camera page at /, OBS viewer at /viewer, stats at /stats")
    _add_renderer_flags(p)
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=None, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--driving", default=None, help="drive from a video file (looped) or /dev/videoN, not a browser")
    p.add_argument("--vcam", action="store_true", help="also send the avatar to a virtual camera (pyvirtualcam)")
    p.add_argument("--vcam-device", default=None, help="virtual camera device, e.g. /dev/video10")
    p.add_argument("--record", default=None, help="also record the avatar to this mp4 file")
    p.add_argument("--playout", type=int, default=None, help="playout buffer in frames (default 3)")
    p.add_argument("--input-queue", type=int, default=None,
                   help="driving frames queued before the oldest drops (default: 1 for preview, so it always renders "
                        "the newest frame; the StreamConfig default for flashportrait, whose windows need a backlog)")
    p.add_argument("--max-sessions", type=int, default=8, help="peers served at once")
    p.add_argument("--handshake-timeout", type=_seconds, default=None, metavar="S",
                   help="free a session whose peer has not connected S seconds after its offer (default 8)")
    p.add_argument("--peer-timeout", type=_seconds, default=None, metavar="S",
                   help="free a session whose peer sent no packet for S seconds, e.g. a killed tab (default 5)")
    p.add_argument("--cert", default=None, help="TLS certificate (PEM): serve https, for cameras on other machines")
    p.add_argument("--key", default=None, help="TLS private key (PEM) for --cert")
    p.add_argument("--loopback-ice", action="store_true",
                   help="offer only 127.0.0.1 ICE candidates (a loopback-bound server offers 127.0.0.1 anyway, "
                        "besides the interfaces' addresses)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME[:PORT]",
                   help="also answer requests whose Host is NAME (a reverse proxy, a LAN name); repeatable. By "
                        "default only the bound address (and loopback names on a loopback bind) is served")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept requests from pages of ORIGIN, e.g. http://studio.lan:3000; repeatable. By "
                        "default only the server's own pages (and clients that send no Origin, like OBS) are")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for the peer connections (stun:HOST[:PORT] or "
                        "turn:USER:PASSWORD@HOST[:PORT]); repeatable. Default: none, no third-party traffic")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("render", help="driving video + reference -> mp4 with the driving audio")
    _add_renderer_flags(p)
    p.add_argument("--driving", required=True, help="driving video file")
    p.add_argument("-o", "--output", default=None, help="output mp4 (default DRIVING-REFERENCE.mp4 here)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("doctor", help="check GPU, weights, virtual camera, Chromium and the port (exit 1 on FIX)")
    p.add_argument("--renderer", choices=RENDERERS, default="flashportrait",
                   help="what to check for: flashportrait (GPU and weights too, the default) or preview (CPU only)")
    p.add_argument("--weights", default="weights", help="weights folder to check")
    p.add_argument("--preset", default="14b", help="model preset the weights must fit")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bench", help="run bench/NAME.py with the remaining arguments")
    p.add_argument("name", help="bench script name, e.g. stream_latency")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and argv is None:  # the real command line, not a caller's main([...])
        from streaming.logs import filter_native_stderr, setup_logging

        setup_logging()  # sessions opening and closing, warm-up progress: one line each
        filter_native_stderr()  # mediapipe's C++ log lines left out
    try:
        return run_command(args)
    except ValueError as err:  # user errors: one sentence, no traceback
        print(f"flashlive {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except RuntimeError as err:  # engine.weights.WeightsError: a missing or wrong checkpoint, one sentence
        weights = sys.modules.get("engine.weights")
        if weights is None or not isinstance(err, weights.WeightsError):
            raise
        print(f"flashlive {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
