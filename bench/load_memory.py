"""Peak host memory (RSS) while loading a DiT checkpoint, against the model's size.

Writes a random-weight checkpoint of a preset to disk in the published layouts, then loads each in a fresh
subprocess and reads the kernel's peak-RSS counter (VmHWM, reset after imports):

    wan-shards-bf16   Wan-style safetensors shards + index, bf16 on disk -> bf16 model (zero copy)
    fp-pickle-fp32    FlashPortrait-style transformer.pt, fp32 on disk (ZeRO-3 dump) -> bf16 model
    naive-bf16        baseline: model built normally + safetensors.load_file + load_state_dict

"after touch" reads every parameter once, so file-mapped weights become resident and count: the honest
"model in RAM" figure for a CPU target. With --device cuda the weights go to the GPU tensor by tensor.

    python bench/load_memory.py --preset 1.3b                  # CPU (here); ~3.5 GB bf16 + 7 GB fp32 on disk
    python bench/load_memory.py --preset 1.3b --device cuda    # on the GPU machine
    python bench/load_memory.py --preset tiny                  # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def write_checkpoints(preset: str, folder: Path, shard_bytes: int) -> dict:
    """Random weights of `preset` as bf16 safetensors shards + index and an fp32 transformer.pt."""
    import torch
    from safetensors.torch import save_file

    from engine.config import get_preset
    from engine.models.dit import WanModel
    from engine.weights import WAN_INDEX

    cfg = get_preset(preset).dit
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shard_dir = folder / "wan"
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        cur[k] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(shard_dir / name))
        weight_map.update({k: name for k in part})
    (shard_dir / WAN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # fp32 pickle: same values, upcast (what a ZeRO-3 fp32 dump looks like)
    fp32 = {}
    while shards:
        fp32.update({k: v.float() for k, v in shards.pop(0).items()})
    torch.save(fp32, folder / "transformer.pt")
    return {"index": str(shard_dir / WAN_INDEX), "pickle": str(folder / "transformer.pt"),
            "bf16_bytes": sum(v.numel() * 2 for v in fp32.values()), "params": sum(v.numel() for v in fp32.values())}


def measure(case: str, preset: str, files: dict, device: str) -> dict:
    """Runs in a fresh process: one load, peak RSS around it."""
    import torch

    from engine.config import get_preset
    from engine.models.dit import WanModel
    from engine.weights import load_dit

    cfg = get_preset(preset).dit
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with torch.device("meta"):
        WanModel(get_preset("tiny").dit)  # the first meta-device build imports torch internals (~70 MB): not load cost
    base = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if case == "wan-shards-bf16":
        model = load_dit(None, cfg, dtype=torch.bfloat16, device=device, paths=[files["index"]])
    elif case == "fp-pickle-fp32":
        model = load_dit(None, cfg, dtype=torch.bfloat16, device=device, paths=[files["pickle"]])
    elif case == "naive-bf16":
        from safetensors.torch import load_file

        model = WanModel(cfg).to(torch.bfloat16)
        sd = {}
        for shard in sorted(Path(files["index"]).parent.glob("*.safetensors")):
            sd.update(load_file(str(shard)))
        model.load_state_dict(sd)
        del sd
        model.to(device)
    else:
        raise ValueError(case)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    peak_load = _status("VmHWM") - base
    rss_load = _status("VmRSS") - base
    with torch.no_grad():
        checksum = float(sum(p.float().sum().item() for p in model.parameters()))  # touch every weight
    out = {"case": case, "load_s": load_s, "peak_rss_load": peak_load, "rss_after_load": rss_load,
           "rss_after_touch": _status("VmRSS") - base, "peak_rss_total": _status("VmHWM") - base,
           "baseline_rss": base, "checksum": checksum}
    if device.startswith("cuda"):
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp folder, removed)")
    ap.add_argument("--shard-gib", type=float, default=1.0)
    ap.add_argument("--cases", default="wan-shards-bf16,fp-pickle-fp32,naive-bf16")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: JSON of (case, files)
    args = ap.parse_args()

    if args.measure:
        job = json.loads(args.measure)
        print(json.dumps(measure(job["case"], args.preset, job["files"], args.device)))
        return

    from bench.common import env_info, write_result

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="flashlive-load-"))
    try:
        t0 = time.perf_counter()
        files = write_checkpoints(args.preset, folder, int(args.shard_gib * GiB))
        print(f"wrote {files['params'] / 1e9:.3f} B params to {folder} in {time.perf_counter() - t0:.0f} s")
        model_bytes = files["bf16_bytes"]
        rows = []
        for case in args.cases.split(","):
            job = json.dumps({"case": case, "files": files})
            res = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--device", args.device,
                                  "--measure", job], capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"case {case} failed")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r["peak_load_vs_model"] = r["peak_rss_load"] / model_bytes
            r["peak_total_vs_model"] = r["peak_rss_total"] / model_bytes
            rows.append(r)
        print(f"\nmodel {args.preset}: {files['params'] / 1e9:.3f} B params = {model_bytes / GiB:.2f} GiB in bf16; "
              f"device {args.device}")
        print(f"{'case':<18}{'load s':>8}{'peak load GiB':>15}{'x model':>9}{'RSS touched GiB':>17}"
              f"{'peak total GiB':>16}{'x model':>9}")
        for r in rows:
            print(f"{r['case']:<18}{r['load_s']:>8.1f}{r['peak_rss_load'] / GiB:>15.2f}{r['peak_load_vs_model']:>9.2f}"
                  f"{r['rss_after_touch'] / GiB:>17.2f}{r['peak_rss_total'] / GiB:>16.2f}"
                  f"{r['peak_total_vs_model']:>9.2f}")
        sums = {r["case"]: r["checksum"] for r in rows}
        payload = {"preset": args.preset, "device": args.device, "params": files["params"],
                   "model_bytes_bf16": model_bytes, "rows": rows, "checksums_agree": len(set(sums.values())) == 1,
                   "env_note": env_info()["device"]}
        name = f"load_memory_{args.preset}_{args.device.split(':')[0]}"
        print(f"checksums agree across cases: {payload['checksums_agree']}")
        print("wrote", write_result(name, payload))
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
