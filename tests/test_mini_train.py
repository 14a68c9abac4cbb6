"""The mini preset's training path on CPU: one step lowers the loss, the autoencoder keeps Wan's frame accounting,
tokens follow the per-clip layout, and training resumes from its checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import get_preset
from engine.models.portrait_encoder import window_latent_tokens
from engine.models.mini_expression import landmark_features
from engine.models.mini_vae import MiniVAE, StreamingMiniDecoder
from tests.conftest import data_file, video_frames

PRESET = get_preset("mini")


@pytest.fixture(scope="module")
def clip():
    """9 frames of lp_d0 and a reference frame, cropped to 128x128 as train/data.py does, with landmarks."""
    from train.data import crop_frames, face_square, track_landmarks

    frames = video_frames("lp_d0.mp4", 30)
    square = face_square(frames)
    crops = crop_frames(frames, square, 128)
    lm, found = track_landmarks(crops[:9])
    assert found.all()
    ref_lm, _ = track_landmarks(crops[29:30])
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    return {"video": to_t(crops[:9]).transpose(0, 1)[None], "landmarks": torch.from_numpy(lm)[None],
            "ref": to_t(crops[29:30]), "ref_landmarks": torch.from_numpy(ref_lm)}


def test_mini_vae_frame_accounting():
    torch.manual_seed(0)
    vae = MiniVAE(PRESET.autoencoder).eval()
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 16, 3, 8, 8)                       # 1 + 4k frames -> 1 + k latents, 16 ch, 8x
    whole = vae.decode(z)
    assert whole.shape == (1, 3, 9, 64, 64)
    stream = StreamingMiniDecoder(vae)
    parts = [stream.decode(z[:, :, i:i + 1]) for i in range(3)]
    assert [p.shape[2] for p in parts] == [1, 4, 4]         # a stream's first latent is 1 frame, later ones 4
    torch.testing.assert_close(torch.cat(parts, dim=2), whole)
    # causal: frames of latent 1 do not change when later frames do
    video2 = video.clone()
    video2[:, :, 5:] = 0
    torch.testing.assert_close(vae.encode(video2)[:, :, :2], z[:, :, :2])
    # one latent space: frame 0 alone encodes as the group of four copies of itself (a still video's latent 1)
    still = video[:, :, :1].expand(-1, -1, 5, -1, -1)
    zs = vae.encode(still)
    torch.testing.assert_close(zs[:, :, 0], zs[:, :, 1])
    torch.testing.assert_close(zs[:, :, 0], z[:, :, 0])
    # and decodes through the group path: a first latent gives the last of the four frames a group latent gives
    torch.testing.assert_close(vae.decode(zs)[:, :, 0], vae.decode(zs)[:, :, 4])


def test_mini_vae_loads_both_checkpoint_layouts(tmp_path):
    from dataclasses import replace

    from engine.models.mini_vae import load_mini_vae

    for shared in (True, False):
        torch.manual_seed(0)
        vae = MiniVAE(replace(PRESET.autoencoder, first_as_group=shared))
        assert ("first_in.weight" in vae.state_dict()) is not shared
        (tmp_path / str(shared)).mkdir()
        torch.save(vae.state_dict(), tmp_path / str(shared) / "mini_vae.pt")
        loaded = load_mini_vae(tmp_path / str(shared), PRESET.autoencoder)
        assert loaded.cfg.first_as_group is shared
        video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
        torch.testing.assert_close(loaded.encode(video), vae.eval().encode(video))


def test_mini_tokens_follow_the_per_clip_layout(clip):
    from train.train_mini import MiniPortrait

    torch.manual_seed(0)
    model = MiniPortrait(PRESET).eval()
    with torch.no_grad():
        emo = model.tokens(clip["landmarks"], clip["ref_landmarks"])        # (1, 3, 97, C)
        per_frame = model.portrait(model.expression(landmark_features(clip["landmarks"], clip["ref_landmarks"])))
    assert emo.shape == (1, 3, 97, PRESET.dit.emo_dim)
    torch.testing.assert_close(emo[0, 0, :24], per_frame[0, :24])          # latent 0: its own first frame's 24
    assert emo[0, 0, 24:].abs().max() == 0                                 # + 73 zero pads
    for i in (1, 2):                                                        # latent i: tokens [96i-73, 96i+23]
        torch.testing.assert_close(emo[0, i], per_frame[0, 96 * i - 73:96 * i + 24])
    # a window starting at latent 1 rebuilds its first latent as frame 4's 24 tokens + 73 zeros
    win = window_latent_tokens(emo[0, 1:], 1, 24)
    torch.testing.assert_close(win[0, :24], per_frame[0, 96:120])
    assert win[0, 24:].abs().max() == 0
    torch.testing.assert_close(win[1], emo[0, 2])


def test_mini_one_training_step_lowers_the_loss(clip):
    from train.train_mini import MiniPortrait, flow_loss

    torch.manual_seed(0)
    vae = MiniVAE(PRESET.autoencoder).eval()
    model = MiniPortrait(PRESET)
    B = 2
    with torch.no_grad():
        x0 = vae.encode(clip["video"]).expand(B, -1, -1, -1, -1).contiguous()          # (2, 16, 3, 16, 16)
        ref = vae.encode_reference(clip["ref"], 3)
    mask = torch.zeros_like(ref[:, :4])
    mask[:, :, 0] = 1
    y = torch.cat([mask, ref], 1).expand(B, -1, -1, -1, -1)
    refs = clip["ref"].expand(B, -1, -1, -1)
    lms = clip["landmarks"].expand(B, -1, -1, -1)
    ref_lms = clip["ref_landmarks"].expand(B, -1, -1)
    weight = torch.ones(B, 1, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    fixed = {"u": torch.tensor([0.3, 0.7]), "noise": torch.randn(x0.shape, generator=g),
             "keep": torch.tensor([1.0, 0.0])}                                       # one sample drops the NFEB
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)   # 1e-3 overshoots from random init at dim 256
    before = flow_loss(model, x0, y, refs, ref_lms, lms, weight, g, **fixed)
    opt.zero_grad()
    before.backward()
    assert model.dit.blocks[0].cross_attn.emo_k_proj.weight.grad.abs().sum() > 0     # the expression path learns
    assert model.expression.net[0].weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = flow_loss(model, x0, y, refs, ref_lms, lms, weight, g, **fixed)
    assert after < 0.95 * before, (float(before), float(after))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """train/data.py's cache of lp_d0 (a folder)."""
    from train.data import build_cache

    return build_cache([data_file("driving", "lp_d0.mp4")], tmp_path_factory.mktemp("cache"), size=128)


def test_mini_packed_cache_matches_the_folder(cache, tmp_path):
    from train.data import load_cache, main

    packed = tmp_path / "mini.npz"
    main(["--cache", str(cache), "--pack", str(packed)])
    raw = sum(p.stat().st_size for p in cache.glob("*.npz"))
    assert packed.stat().st_size < raw / 4                       # JPEG frames, float16 landmarks
    (a,), (b,) = load_cache(cache), load_cache(packed)
    assert b.name == a.name and b.frames.shape == a.frames.shape and b.fps == a.fps
    assert (b.frames - a.frames).abs().mean() < 0.02               # < 1.3 of 255 levels on average: JPEG quality 95
    assert (b.landmarks - a.landmarks).abs().max() < 1e-3          # float16 in [0, 1] crop coordinates
    assert (b.found == a.found).all()
    with pytest.raises(ValueError, match="not 64"):
        load_cache(packed, size=64)


def test_mini_training_resumes(tmp_path, cache):
    from train.train_mini import main

    args = ["--stage", "vae", "--run", str(tmp_path / "run"), "--cache", str(cache), "--vae-batch", "1",
            "--vae-crop", "32", "--threads", "1"]
    main(args + ["--steps", "2"])
    first = torch.load(tmp_path / "run" / "vae.ckpt", weights_only=False)
    assert first["step"] == 2 and len(first["log"]) == 2
    main(args + ["--steps", "3"])
    second = torch.load(tmp_path / "run" / "vae.ckpt", weights_only=False)
    assert second["step"] == 3 and [s for s, _, _ in second["log"]] == [1, 2, 3]   # continued, not restarted
    assert second["opt"]["state"][0]["step"] == 3                                    # optimizer state carried
    assert not np.allclose(second["model"]["latent_std"].numpy(), 1.0)              # latent statistics measured


def test_mini_dit_batch_gathers_the_clips_of_its_draws():
    from train.data import ClipDataset, Video
    from train.train_mini import LatentBank, dit_batch

    torch.manual_seed(0)
    vae = MiniVAE(PRESET.autoencoder).eval()
    videos = [Video(f"v{i}", torch.rand(n, 3, 32, 32) * 2 - 1, torch.rand(n, 478, 3), np.ones(n, bool), 25.0)
              for i, n in enumerate((30, 45))]
    data = ClipDataset(videos, "train")
    bank = LatentBank(vae, videos)
    for ref_first in (1.0, 0.0):
        x0, y, refs, ref_lms, lms, weight = dit_batch(bank, data, 6, 2, np.random.default_rng(1), ref_first)
        assert x0.shape == (6, 16, 3, 4, 4) and y.shape == (6, 20, 3, 4, 4) and weight.shape == (6, 1, 3, 4, 4)
        for b in range(6):   # recover each sample's video and start from its landmarks, then check the gathers
            v, s = next((v, s) for v, vid in enumerate(videos) for s in range(len(vid.landmarks) - 8)
                        if torch.equal(lms[b], vid.landmarks[s:s + 9]))
            torch.testing.assert_close(x0[b], bank.clip(v, s, 2))
            r = next(r for r in range(len(videos[v].frames)) if torch.equal(refs[b], videos[v].frames[r]))
            if ref_first == 1.0:
                assert r == s
            torch.testing.assert_close(ref_lms[b], videos[v].landmarks[r])       # the anchor of its tokens
            torch.testing.assert_close(y[b, 4:, 0], bank.first[v][r])
            torch.testing.assert_close(y[b, 4:, 1:], bank.zero_group[:, None].expand(-1, 2, -1, -1))
            assert (y[b, :4, 0] == 1).all() and (y[b, :4, 1:] == 0).all()
        # the bank's latents are the autoencoder's: a clip's latents equal encoding its frames
        full = vae.encode(videos[v].frames[s:s + 9].transpose(0, 1)[None])[0]
        torch.testing.assert_close(x0[b], full, atol=1e-4, rtol=1e-4)


def test_mini_references_are_rarely_the_clip_and_never_near_it():
    """Half the clips referencing their own first frame taught the mini to copy the reference (its x0 prediction
    moved 20-24% of the way toward a reference 240 frames away): the training draws keep
    `--ref-first` (default 0.1) of the clips on their first frame and every other reference `--ref-gap` frames
    away from the clip."""
    from train.data import ClipDataset, Video
    from train.train_mini import LatentBank, dit_batch, other_reference, parse_args

    args = parse_args(["--stage", "dit"])
    assert args.ref_first <= 0.1 and args.ref_gap >= 13          # 13: the longest clip (4 latents) in frames
    torch.manual_seed(0)
    videos = [Video(f"v{i}", torch.rand(n, 3, 32, 32) * 2 - 1, torch.rand(n, 478, 3), np.ones(n, bool), 25.0)
              for i, n in enumerate((60, 90))]
    data = ClipDataset(videos, "train")
    bank = LatentBank(MiniVAE(PRESET.autoencoder).eval(), videos)
    gap, n = 10, 9
    _, _, refs, _, lms, _ = dit_batch(bank, data, 48, 2, np.random.default_rng(3), 0.0, ref_gap=gap)
    for b in range(48):
        v, s = next((v, s) for v, vid in enumerate(videos) for s in range(len(vid.landmarks) - n + 1)
                    if torch.equal(lms[b], vid.landmarks[s:s + n]))
        r = next(r for r in range(len(videos[v].frames)) if torch.equal(refs[b], videos[v].frames[r]))
        assert r < s - gap or r >= s + n + gap, (s, r)
        assert r < data.ranges[v][1]                                                 # and inside the split
    gen = np.random.default_rng(0)
    draws = {other_reference(gen, 0, 40, 10, 9, 8) for _ in range(400)}
    assert draws == set(range(0, 2)) | set(range(27, 40))                            # all of them, uniformly reachable
    assert {other_reference(gen, 0, 20, 5, 9, 8) for _ in range(200)} == set(range(20))   # none that far: anywhere


def test_mini_training_and_rendering_condition_a_window_alike(clip):
    """A window of the renderer (engine/mini.render_clip) starting at latent 1 is conditioned exactly as a training
    clip that starts at its first frame (train/train_mini.py): tokens, y, CLIP features, the DiT's output."""
    from engine.mini import MiniModels
    from engine.models.portrait_encoder import group_latent_tokens
    from train.data import Video
    from train.train_mini import LatentBank, MiniPortrait

    torch.manual_seed(0)
    model = MiniPortrait(PRESET).eval()
    vae = MiniVAE(PRESET.autoencoder).eval()
    frames = torch.cat([clip["video"][0].transpose(0, 1), clip["ref"]])            # 9 clip frames + the reference
    lms = torch.cat([clip["landmarks"][0], clip["ref_landmarks"]])
    bank = LatentBank(vae, [Video("c", frames, lms, np.ones(10, bool), 25.0)])
    models = MiniModels(PRESET, model.dit, model.portrait, model.expression, model.clip, vae, model.context.detach())
    with torch.no_grad():
        # training: the clip of frames 4..8 (2 latents), reference frame 9 (bank latent, zeros after it)
        tok_train = model.tokens(lms[None, 4:9], lms[None, 9])
        y_train = torch.cat([bank.firsts(np.array([0]), np.array([9]))[:, :, None], bank.zero_group[None, :, None]], 2)
        # rendering: the whole clip's tokens grouped globally, the window [1, 3) rebuilt; y from the reference image
        grouped = group_latent_tokens(models.frame_tokens(lms[:9], lms[9]).flatten(0, 1)[None])[0]
        tok_render = window_latent_tokens(grouped[1:3], 1, PRESET.portrait.tokens_per_frame)[None]
        y_render = vae.encode_reference(clip["ref"], 2)
        torch.testing.assert_close(tok_render, tok_train)
        torch.testing.assert_close(y_render, y_train, atol=1e-5, rtol=1e-5)
        mask = torch.zeros(1, 4, 2, *y_train.shape[-2:])
        mask[:, :, 0] = 1
        x, t = torch.randn(1, 16, 2, *y_train.shape[-2:]), torch.tensor([700.0])
        ip = torch.ones(1)
        trained = model(x, t, torch.cat([mask, y_train], 1), clip["ref"], lms[None, 9], lms[None, 4:9], ip_scale=ip)
        clip_fea = models.clip(models.clip.preprocess(clip["ref"]))
        rendered = models.dit(x, t, models.context, clip_fea, torch.cat([mask, y_render], 1), tok_render, ip_scale=ip)
    torch.testing.assert_close(rendered, trained, atol=1e-4, rtol=1e-4)


def test_mini_keep_best_holds_the_weights_at_the_lowest_held_out_loss(tmp_path):
    """`--val-every` keeps the DiT stage's weights at its held-out minimum (dit_best.pt) for `--export --best`:
    a later, higher (or equal) held-out loss leaves them alone."""
    from train.train_mini import export, keep_best

    layer, path, val, saved = torch.nn.Linear(2, 2), tmp_path / "dit_best.pt", [], []
    for step, loss in [(0, 0.59), (250, 0.42), (500, 0.47), (750, 0.42), (1000, 0.45)]:
        layer.weight.data.fill_(step)
        val.append((step, loss))
        saved.append(keep_best(path, layer, val))
    assert saved == [True, True, False, False, False]
    best = torch.load(path, weights_only=False)
    assert best["step"] == 250 and best["held_out_loss"] == 0.42 and torch.all(best["model"]["weight"] == 250)
    with pytest.raises(SystemExit, match="--val-every"):
        export(tmp_path / "empty_run", tmp_path / "out", None, best=True)


def test_mini_expression_features_are_relative_and_pose_free(clip):
    """The landmark features read a frame's motion relative to the reference's face with the head's rotation taken
    out: the anchor itself reads zero; a turned, shifted, zoomed head reads the same expression (only the pose and
    where parts change); a mouth opened on a turned head reads as the same opening on a frontal one."""
    from engine.face_mesh import STABLE
    from engine.models.mini_expression import SKULL

    assert SKULL == tuple(STABLE.tolist())                                  # the copy stays the mesh's skull points
    lm, anchor = clip["landmarks"][0, 4].double(), clip["ref_landmarks"][0].double()
    expr = slice(0, 478 * 3)
    assert landmark_features(anchor, anchor).abs().max() < 1e-5

    def turn(pts, yaw, pitch, shift=(0.0, 0.0), zoom=1.0):
        a, b = np.radians(yaw), np.radians(pitch)
        ry = torch.tensor([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        rx = torch.tensor([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        c = pts.mean(0)
        return (pts - c) @ (rx @ ry).T * zoom + c + torch.tensor([*shift, 0.0], dtype=pts.dtype)

    base = landmark_features(lm, anchor)
    moved = landmark_features(turn(lm, 15, -10, (0.03, -0.02), 1.1), anchor)
    torch.testing.assert_close(moved[expr], base[expr], atol=1e-4, rtol=0)
    assert (moved[expr.stop:expr.stop + 6] - base[expr.stop:expr.stop + 6]).abs().max() > 0.1   # the pose part
    assert (moved[-3:] - base[-3:]).abs().min() > 0.05                                         # and where
    opened = lm.clone()
    opened[[14, 17, 87, 317]] += torch.tensor([0.0, 0.02, 0.0], dtype=lm.dtype)             # the lower lip drops
    frontal = landmark_features(opened, anchor)[expr] - base[expr]
    turned = landmark_features(turn(opened, 15, -10), anchor)[expr] - landmark_features(turn(lm, 15, -10), anchor)[expr]
    assert frontal.abs().max() > 0.1                                                           # it is seen
    torch.testing.assert_close(turned, frontal, atol=1e-4, rtol=0)


def test_mini_ema_is_the_moving_average_and_is_what_export_writes(tmp_path, cache):
    from train.train_mini import MiniPortrait, main

    run = tmp_path / "run"
    common = ["--run", str(run), "--cache", str(cache), "--threads", "1"]
    main(["--stage", "vae", "--steps", "1", "--vae-batch", "1", "--vae-crop", "32"] + common)
    main(["--stage", "dit", "--steps", "1", "--batch", "1", "--latents", "2", "--ema", "0.75",
          "--feature-noise", "0.1", "--lr", "1e-2"] + common)
    state = torch.load(run / "dit.ckpt", weights_only=False)
    torch.manual_seed(0)                                   # the stage's seed: its initial weights again
    init = MiniPortrait(PRESET).state_dict()
    trained, ema = state["model"], state["ema"]
    moved = [k for k in trained if not torch.equal(trained[k], init[k])]
    assert len(moved) > 10                                 # the step changed the weights...
    for k in moved:                                        # ...and the average took a quarter of the way
        torch.testing.assert_close(ema[k], 0.75 * init[k] + 0.25 * trained[k])
    main(["--export", str(tmp_path / "out")] + common)
    exported = torch.load(tmp_path / "out" / "transformer.pt", weights_only=True)
    key = next(k for k in moved if k.startswith("dit."))
    torch.testing.assert_close(exported[key[4:]].float(), ema[key].half().float())


def test_mini_feature_noise_reaches_the_tokens(clip):
    from engine.models.mini_expression import FEATURE_DIM
    from train.train_mini import MiniPortrait

    torch.manual_seed(0)
    model = MiniPortrait(PRESET).eval()
    lm, anchor = clip["landmarks"], clip["ref_landmarks"]
    plain = model.tokens(lm, anchor)
    torch.testing.assert_close(model.tokens(lm, anchor, torch.zeros(*lm.shape[:2], FEATURE_DIM)), plain)
    noisy = model.tokens(lm, anchor, 0.1 * torch.randn(*lm.shape[:2], FEATURE_DIM))
    assert (noisy - plain).abs().mean() > 1e-3 * plain.abs().mean()


def test_mini_region_weight_marks_the_mouth_and_eyes(clip):
    from train.train_mini import EYES, LIPS, region_weight

    lm = clip["landmarks"][:, :1]                                   # (1, 1, 478, 3), frame 0 of lp_d0
    w = region_weight(lm, 128, lip_weight=3.0, eye_weight=5.0)[0, 0]
    at = lambda pts: w[int(pts[:, 1].mean() * 128), int(pts[:, 0].mean() * 128)].item()  # noqa: E731
    assert at(lm[0, 0, list(LIPS)]) == 1 + 1 + 3                    # everywhere 1, the face box 1, the mouth box 3
    assert at(lm[0, 0, list(EYES[0])]) == 1 + 1 + 5 and at(lm[0, 0, list(EYES[1])]) == 1 + 1 + 5
    assert w[0, 0].item() == 1 and w[-1, -1].item() == 1            # the crop's corners: background


def test_mini_decoder_stage_trains_the_decoder_alone(tmp_path, cache):
    """--stage decoder moves the decoder (region-weighted loss) and leaves the encoder and its latent statistics,
    the space the DiT was trained in, exactly as the autoencoder stage left them; export writes the decoder's."""
    from train.train_mini import load_trained_vae, main

    run = tmp_path / "run"
    common = ["--run", str(run), "--cache", str(cache), "--threads", "1", "--vae-batch", "1", "--vae-crop", "32"]
    main(["--stage", "vae", "--steps", "1"] + common)
    main(["--stage", "decoder", "--steps", "2", "--lr-vae", "1e-2", "--decoder-lip-weight", "8"] + common)
    vae = torch.load(run / "vae.ckpt", weights_only=False)["model"]
    dec = torch.load(run / "decoder.ckpt", weights_only=False)
    assert dec["step"] == 2
    decoder_keys = [k for k in vae if k.startswith("decoder.")]
    assert decoder_keys and any(not torch.equal(vae[k], dec["model"][k]) for k in decoder_keys)
    frozen = [k for k in vae if k.startswith(("encoder.", "first_in.", "group_in.", "latent_"))]
    assert len(frozen) > 4 and all(torch.equal(vae[k], dec["model"][k]) for k in frozen)  # encoder, statistics
    exported = load_trained_vae(run, PRESET, decoder=True).state_dict()    # what --export writes as mini_vae.pt
    assert all(torch.equal(exported[k], dec["model"][k]) for k in vae)
