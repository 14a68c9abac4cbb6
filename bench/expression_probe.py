"""Does a trained mini follow its expression tokens, and how much does it copy its reference? One DiT pass per clip.

    python bench/expression_probe.py --weights weights/mini                 # -> expression_probe_mini.json (~1 min)

On clips of the training split (the DiT's own training task: x_t = (1 - s) x0 + s noise, one prediction), for two
noise levels u (shifted as in training):
    token use   the flow loss on latents 1..k, overall and in the mouth box, with the clip's own landmarks, with
                the landmarks of the clip of the same video whose mouth differs most ("swap"), and with the
                expression branch off (ip_scale 0). A model that ignores its tokens scores the three alike.
    copy        beta = <x0_hat - x0, ref - x0> / |ref - x0|^2 over latents 1..k: how far the x0 prediction moves
                toward the reference latent (0: not at all, 1: the reference itself), with the reference = the
                clip's first frame and = the split's frame farthest from the clip. A beta well above 0 for the far
                reference is a ghost of the reference in every rendered frame.
The checkpoint trained with half the clips referencing their own first frame: swap raises the loss 2.5x, also in the
mouth box, ip_scale 0 1.6-2.2x (the tokens are used); beta 0.38-0.39 (first frame) and 0.21-0.25 (the far frame;
expression_probe_mini_ref05.json). The committed one, continued with `--ref-first 0.1 --ref-gap 16`: swap 4x,
ip_scale 0 2x, beta 0.31-0.33 and 0.15-0.17 (expression_probe_mini.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

VIDEOS = ("lp_d6", "lp_d11", "lp_d12", "lp_d20")   # the ones with the most mouth motion


def mouth_opening(lm: torch.Tensor) -> torch.Tensor:
    """(..., 478, 3) -> (...,) inner-lip distance over the inter-iris distance."""
    return (lm[..., 13, :2] - lm[..., 14, :2]).norm(dim=-1) / (lm[..., 468, :2] - lm[..., 473, :2]).norm(dim=-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="weights/mini")
    ap.add_argument("--cache", default=None, help="training cache (default: train/data.py's)")
    ap.add_argument("--split", choices=["train", "test"], default="train")
    ap.add_argument("--videos", nargs="*", default=list(VIDEOS))
    ap.add_argument("--clips", type=int, default=8, help="clips per video")
    ap.add_argument("--name", default="expression_probe_mini")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from engine.config import get_preset
    from engine.mini import load_mini
    from engine.sampler import shift_sigmas
    from kernels.attention import set_backend as set_attention_backend
    from kernels.fused import set_fused_kernels
    from train.data import DEFAULT_CACHE, load_cache, split_range
    from train.train_mini import LIPS, SHIFT, LatentBank, MiniPortrait, init_from_export, region_mask

    set_fused_kernels(False)
    set_attention_backend("sdpa")
    model = MiniPortrait(get_preset("mini"))
    init_from_export(model, Path(args.weights))
    model.eval()
    videos = [v for v in load_cache(args.cache or DEFAULT_CACHE) if v.name in args.videos]
    bank = LatentBank(load_mini(args.weights).vae.float(), videos)
    rng = np.random.default_rng(0)
    k, n = 2, 9
    levels = (0.5, 0.9)
    rows = {(name, u): [] for u in levels for name in ("own", "swap", "ip0", "beta_first", "beta_far")}
    with torch.no_grad():
        for vi, v in enumerate(videos):
            a, b = split_range(len(v.frames), args.split)
            mouth = mouth_opening(v.landmarks).numpy()
            starts = np.arange(a, b - n + 1)
            for _ in range(args.clips):
                s = int(rng.choice(starts))
                other = int(starts[np.argmax(np.abs(mouth[starts + 4] - mouth[s + 4]))])
                far = a if s - a > b - (s + n) else b - 1
                x0 = bank.clip(vi, s, k)[None]                                       # (1, 16, 3, h, w)
                box = region_mask(v.landmarks[s:s + n:4][None], LIPS, x0.shape[-1], 0.03)[:, None, 1:]
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(s))
                y = {r: bank.reference_y(bank.first[vi][r][None], k) for r in (s, far)}  # the I2V conditioning
                for u in levels:
                    sigma = shift_sigmas(torch.tensor([u]), SHIFT)
                    xt = (1 - sigma) * x0 + sigma * noise
                    target = (noise - x0)[:, :, 1:]
                    for name, r, lm, ip in (("own", far, s, 1.0), ("swap", far, other, 1.0), ("ip0", far, s, 0.0),
                                            ("beta_first", s, s, 1.0), ("beta_far", far, s, 1.0)):
                        pred = model(xt, sigma * 1000, y[r], v.frames[r][None], v.landmarks[r][None],
                                     v.landmarks[lm:lm + n][None], ip_scale=torch.full((1,), ip))[:, :, 1:]
                        if name.startswith("beta"):
                            ref = bank.first[vi][r][None, :, None]
                            err, d = (xt[:, :, 1:] - sigma * pred) - x0[:, :, 1:], ref - x0[:, :, 1:]
                            rows[name, u].append(float((err * d).sum() / (d * d).sum()))
                        else:
                            sq = (pred - target) ** 2
                            rows[name, u].append((float(sq.mean()), float((sq * box).sum() / (box.sum() * 16))))
    payload = {"weights": args.weights, "split": args.split, "videos": args.videos, "clips_per_video": args.clips}
    print(f"{'u':>4} {'sigma':>6} | loss own / swap / ip0 (mouth box)                    | beta first | beta far")
    for u in levels:
        sigma = float(shift_sigmas(torch.tensor([u]), SHIFT))
        loss = {m: np.mean(rows[m, u], axis=0) for m in ("own", "swap", "ip0")}
        beta = {m: float(np.mean(rows[m, u])) for m in ("beta_first", "beta_far")}
        print(f"{u:4.1f} {sigma:6.3f} | " + " / ".join(f"{loss[m][0]:.3f} ({loss[m][1]:.3f})" for m in loss)
              + f" | {beta['beta_first']:10.3f} | {beta['beta_far']:8.3f}")
        payload[f"u{u}"] = {"sigma": round(sigma, 4), **{f"loss_{m}": round(float(loss[m][0]), 4) for m in loss},
                            **{f"mouth_loss_{m}": round(float(loss[m][1]), 4) for m in loss},
                            **{m: round(beta[m], 4) for m in beta}}
    print(f"wrote {write_result(args.name, payload)}")


if __name__ == "__main__":
    main()
