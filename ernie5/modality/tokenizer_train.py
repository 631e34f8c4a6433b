"""Training loops for the vision and audio tokenizers with a held-out report against trivial baselines.

Vision: PSNR of reconstructions vs the *mean training image*; bit usage (per-bit entropy, distinct tokens per
scale); a PNG with held-out originals, reconstructions before training and after training.
Audio: SNR (silence scores 0 dB) and multi-resolution STFT distance vs *silence*; per-level code usage.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import paddle

from ernie5.data.digits_world import is_heldout, load_arrays
from ernie5.modality.audio import AudioTokenizer, RandomConvTeacher1d, multi_resolution_stft_loss, snr_db
from ernie5.modality.media_io import TokenizerRecipe, load_asset, save_asset
from ernie5.modality.vision import PatchDiscriminator, RandomConvTeacher, VisionTokenizer, inflate_state


def _lr(step: int, cfg) -> float:
    """Short linear warm-up, then cosine to min_lr."""
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    held = np.array([is_heldout(i) for i in range(n)])
    return np.nonzero(~held)[0], np.nonzero(held)[0]


def _to_pixels(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / 127.5 - 1.0


def psnr(rec: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((np.clip(rec, -1, 1) - ref) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_tokenizer(recipe: TokenizerRecipe, log=print) -> dict:
    paddle.seed(recipe.seed)
    np.random.seed(recipe.seed)
    data = load_arrays(recipe.data_dir)
    if recipe.kind == "vision":
        return _train_vision(recipe, data, log)
    return _train_audio(recipe, data, log)


# -- vision ---------------------------------------------------------------------------------------------------
def _vision_eval(model, x_BCTHW) -> tuple[np.ndarray, list]:
    model.eval()
    with paddle.no_grad():
        codes = model.encode(x_BCTHW)
        rec = model.decode(codes).numpy()
    model.train()
    return rec, codes


def _bit_usage(codes, bits: int) -> dict:
    """Per scale: mean per-bit entropy (1.0 = every bit used evenly) and distinct tokens seen / 2^bits."""
    out = []
    for c in codes:
        b = c.numpy().reshape(-1, bits).astype(np.int64)
        p = b.mean(0).clip(1e-9, 1 - 1e-9)
        ent = float((-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).mean())
        distinct = len(np.unique(b @ (1 << np.arange(bits))))
        out.append({"side": int(c.shape[2]), "bit_entropy": round(ent, 3), "distinct_tokens": distinct,
                    "vocab": 1 << bits})
    return out


def _save_png(path: Path, rows: list[np.ndarray], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0))
    for r, (imgs, lab) in enumerate(zip(rows, labels)):
        for i in range(n):
            ax = axes[r, i]
            ax.imshow(np.clip(imgs[i], -1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(lab, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _train_vision(recipe: TokenizerRecipe, data: dict, log) -> dict:
    cfg, tc = recipe.vision, recipe.train
    imgs = _to_pixels(data["images"])
    if imgs.shape[-1] != cfg.image_size:
        from ernie5.errors import UserError

        raise UserError("vision.image_size", f"{cfg.image_size} but the data has {imgs.shape[-1]}px images")
    vids = _to_pixels(data["videos"])
    tr, va = _split(len(imgs))
    vtr, vva = _split(len(vids))
    teacher = RandomConvTeacher(cfg.in_channels) if tc.teacher == "random_conv" else None
    model = VisionTokenizer(cfg, teacher)
    if recipe.init_from:
        init = load_asset(recipe.init_from)
        inflate_state(init.state_dict(), model)
        log(f"initialised from {recipe.init_from} (bits {init.cfg.bits} -> {cfg.bits})")
    x_val = paddle.to_tensor(imgs[va][:, None, None])
    v_val = paddle.to_tensor(vids[vva][:32][:, None])
    show = x_val[:8]
    before, _ = _vision_eval(model, show)
    opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=model.parameters())
    disc = d_opt = None
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator(cfg.in_channels)
        d_opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=disc.parameters(), beta1=0.5)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.time()
    for step in range(tc.steps):
        if tc.video_every and step % tc.video_every == tc.video_every - 1:
            x = paddle.to_tensor(vids[rng.choice(vtr, tc.video_batch_size)][:, None])
        else:
            x = paddle.to_tensor(imgs[rng.choice(tr, tc.batch_size)][:, None, None])
        opt.set_lr(_lr(step, tc))
        rec, losses = model(x)
        total = losses["total"]
        if disc is not None and step >= tc.disc_start:
            B, C, T, H, W = rec.shape
            fake = rec.transpose([0, 2, 1, 3, 4]).reshape([B * T, C, H, W])
            losses["adv"] = -disc(fake).mean()
            total = total + cfg.adversarial_weight * losses["adv"]
        total.backward()
        opt.step()
        opt.clear_grad()
        if disc is not None and step >= tc.disc_start:  # hinge loss on real vs detached fake frames
            real = x.transpose([0, 2, 1, 3, 4]).reshape([B * T, C, H, W])
            d_loss = (paddle.nn.functional.relu(1 - disc(real)).mean()
                      + paddle.nn.functional.relu(1 + disc(fake.detach())).mean())
            d_loss.backward()
            d_opt.step()
            d_opt.clear_grad()
        if step % tc.log_every == 0 or step == tc.steps - 1:
            log(f"step {step:4d} " + " ".join(f"{k} {float(v):.4f}" for k, v in losses.items())
                + f" ({time.time() - t0:.0f}s)")
    rec_val, codes = _vision_eval(model, x_val)
    ref = x_val.numpy()
    mean_img = imgs[tr].mean(0)
    rec_vid, _ = _vision_eval(model, v_val)
    report = {
        "heldout_images": int(len(va)),
        "psnr_db": round(psnr(rec_val, ref), 2),
        "baseline_mean_image_psnr_db": round(psnr(np.broadcast_to(mean_img, ref.shape), ref), 2),
        "video_psnr_db": round(psnr(rec_vid, v_val.numpy()), 2),
        "video_baseline_mean_frame_psnr_db": round(psnr(np.broadcast_to(vids[vtr].mean(0), v_val.shape),
                                                        v_val.numpy()), 2),
        "bit_usage": _bit_usage(codes, cfg.bits),
        "bits": cfg.bits, "scales": cfg.scales, "steps": tc.steps, "train_seconds": round(time.time() - t0, 1),
    }
    after, _ = _vision_eval(model, show)
    out = save_asset(recipe, model, report)
    png = out.with_suffix(".png")
    _save_png(png, [show.numpy()[:, 0, 0], before[:, 0, 0], after[:, 0, 0]],
              ["held-out", "before training", f"after ({cfg.bits} bits)"])
    report["png"] = str(png)
    report["asset"] = str(out)
    return report


# -- audio ----------------------------------------------------------------------------------------------------
def _clips(data: dict, idx: np.ndarray) -> list[np.ndarray]:
    lens = [c["samples"] for c in data["audio_index"]["clips"]]
    return [data["audio"][i, :lens[i]] for i in idx]


def _crop_batch(clips, n: int, length: int, rng) -> np.ndarray:
    out = np.zeros((n, length), np.float32)
    for j, k in enumerate(rng.integers(0, len(clips), n)):
        c = clips[k]
        start = int(rng.integers(0, max(1, len(c) - length + 1)))
        seg = c[start:start + length]
        out[j, :len(seg)] = seg
    return out


def _audio_eval(model, clips, cfg) -> dict:
    """Whole held-out clips (padded to whole frames), one at a time."""
    model.eval()
    snrs, stft, stft0 = [], [], []
    all_codes = []
    with paddle.no_grad():
        for c in clips:
            n = -(-len(c) // cfg.hop) * cfg.hop
            x = np.zeros((1, n), np.float32)
            x[0, :len(c)] = c
            xt = paddle.to_tensor(x)
            codes = model.encode(xt)
            rec = model.decode(codes)
            snrs.append(snr_db(rec.numpy()[0, :len(c)], c))
            stft.append(float(multi_resolution_stft_loss(rec, xt, cfg.stft_resolutions)))
            stft0.append(float(multi_resolution_stft_loss(paddle.zeros_like(xt), xt, cfg.stft_resolutions)))
            all_codes.append(codes.numpy()[0])
    model.train()
    codes = np.concatenate(all_codes)
    levels = []
    for level in range(cfg.levels):
        counts = np.bincount(codes[:, level], minlength=cfg.codebook_size)
        p = counts[counts > 0] / counts.sum()
        levels.append({"used": int((counts > 0).sum()), "codebook": cfg.codebook_size,
                       "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 1)})
    return {"snr_db": round(float(np.mean(snrs)), 2), "baseline_silence_snr_db": 0.0,
            "stft_distance": round(float(np.mean(stft)), 3),
            "baseline_silence_stft_distance": round(float(np.mean(stft0)), 3), "code_usage": levels}


def _train_audio(recipe: TokenizerRecipe, data: dict, log) -> dict:
    cfg, tc = recipe.audio, recipe.train
    sr = data["audio_index"]["sample_rate"]
    if sr != cfg.sample_rate:
        from ernie5.errors import UserError

        raise UserError("audio.sample_rate", f"{cfg.sample_rate} but the data is at {sr} Hz")
    tr, va = _split(len(data["audio_index"]["clips"]))
    train_clips, val_clips = _clips(data, tr), _clips(data, va)
    teacher = RandomConvTeacher1d() if tc.teacher == "random_conv" else None
    model = AudioTokenizer(cfg, teacher)
    if recipe.init_from:
        init = load_asset(recipe.init_from)
        model.set_state_dict(init.state_dict())
    opt = paddle.optimizer.Adam(learning_rate=tc.lr, parameters=model.parameters())
    length = max(cfg.hop, int(tc.crop_seconds * cfg.sample_rate) // cfg.hop * cfg.hop)
    rng = np.random.default_rng(recipe.seed)
    t0 = time.time()
    for step in range(tc.steps):
        x = paddle.to_tensor(_crop_batch(train_clips, tc.batch_size, length, rng))
        opt.set_lr(_lr(step, tc))
        _, losses, _, norms = model(x)
        losses["total"].backward()
        opt.step()
        opt.clear_grad()
        if step % tc.log_every == 0 or step == tc.steps - 1:
            log(f"step {step:4d} " + " ".join(f"{k} {float(v):.4f}" for k, v in losses.items())
                + " residual " + "/".join(f"{n:.3f}" for n in norms) + f" ({time.time() - t0:.0f}s)")
    report = {"heldout_clips": len(val_clips), "engine": data["audio_index"]["engine"],
              **_audio_eval(model, val_clips, cfg), "frame_rate_hz": cfg.frame_rate, "levels": cfg.levels,
              "steps": tc.steps, "train_seconds": round(time.time() - t0, 1)}
    out = save_asset(recipe, model, report)
    report["asset"] = str(out)
    return report
